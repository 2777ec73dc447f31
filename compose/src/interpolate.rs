//! `${VAR}` substitution in compose values, as docker/cli's
//! `compose/template` does it: `$VAR`, `${VAR}`, `${VAR:-default}`,
//! `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+other}`,
//! `${VAR+other}`, and `$$` for a literal `$`. A default or alternative may
//! itself hold substitutions. A variable that is not set becomes "" (and a
//! warning), unless its form makes that an error.

#[derive(Debug, PartialEq, Eq)]
pub enum Problem {
    /// The text is not a valid template.
    Invalid(String),
    /// `${VAR:?msg}` / `${VAR?msg}` without a value.
    Missing { var: String, message: String },
}

/// Substitutes the variables in `s`. `lookup` gives a variable's value;
/// the names of variables used but not set are added to `unset`.
pub fn interpolate(s: &str, lookup: &dyn Fn(&str) -> Option<String>, unset: &mut Vec<String>) -> Result<String, Problem> {
    if !s.contains('$') {
        return Ok(s.to_string());
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut literal_from = 0;
    while i < b.len() {
        if b[i] != b'$' {
            i += 1;
            continue;
        }
        out.push_str(&s[literal_from..i]);
        match b.get(i + 1) {
            Some(b'$') => {
                out.push('$');
                i += 2;
            }
            Some(b'{') => {
                let close = matching_brace(s, i + 2).ok_or_else(|| Problem::Invalid(format!("unterminated \"${{\" in {s:?}")))?;
                out.push_str(&braced(&s[i + 2..close], lookup, unset)?);
                i = close + 1;
            }
            Some(c) if c.is_ascii_alphabetic() || *c == b'_' => {
                let end = s[i + 1..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(s.len(), |n| i + 1 + n);
                out.push_str(&value_or_blank(&s[i + 1..end], lookup, unset));
                i = end;
            }
            _ => {
                return Err(Problem::Invalid(format!(
                    "a '$' in {s:?} must start a variable ($VAR or ${{VAR}}); write $$ for a literal '$'"
                )));
            }
        }
        literal_from = i;
    }
    out.push_str(&s[literal_from..]);
    Ok(out)
}

/// The index of the `}` that closes a `${` whose content starts at `from`.
fn matching_brace(s: &str, from: usize) -> Option<usize> {
    let b = s.as_bytes();
    let mut depth = 1;
    let mut i = from;
    while i < b.len() {
        match b[i] {
            b'$' if b.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 2;
                continue;
            }
            b'$' if b.get(i + 1) == Some(&b'$') => {
                i += 2;
                continue;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

fn value_or_blank(name: &str, lookup: &dyn Fn(&str) -> Option<String>, unset: &mut Vec<String>) -> String {
    lookup(name).unwrap_or_else(|| {
        if !unset.iter().any(|u| u == name) {
            unset.push(name.to_string());
        }
        String::new()
    })
}

/// The content of `${...}`.
fn braced(content: &str, lookup: &dyn Fn(&str) -> Option<String>, unset: &mut Vec<String>) -> Result<String, Problem> {
    let name_len = content.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(content.len());
    let name = &content[..name_len];
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(Problem::Invalid(format!("\"${{{content}}}\": expected a variable name")));
    }
    let rest = &content[name_len..];
    let value = lookup(name);
    let set_and_not_empty = value.as_deref().is_some_and(|v| !v.is_empty());
    let missing = |message: &str| Problem::Missing { var: name.to_string(), message: message.to_string() };
    if rest.is_empty() {
        return Ok(value_or_blank(name, lookup, unset));
    }
    if let Some(default) = rest.strip_prefix(":-") {
        return if set_and_not_empty { Ok(value.unwrap_or_default()) } else { interpolate(default, lookup, unset) };
    }
    if let Some(message) = rest.strip_prefix(":?") {
        return if set_and_not_empty { Ok(value.unwrap_or_default()) } else { Err(missing(message)) };
    }
    if let Some(alt) = rest.strip_prefix(":+") {
        return if set_and_not_empty { interpolate(alt, lookup, unset) } else { Ok(String::new()) };
    }
    if let Some(default) = rest.strip_prefix('-') {
        return match value {
            Some(v) => Ok(v),
            None => interpolate(default, lookup, unset),
        };
    }
    if let Some(message) = rest.strip_prefix('?') {
        return value.ok_or_else(|| missing(message));
    }
    if let Some(alt) = rest.strip_prefix('+') {
        return if value.is_some() { interpolate(alt, lookup, unset) } else { Ok(String::new()) };
    }
    Err(Problem::Invalid(format!(
        "\"${{{content}}}\": expected ${{VAR}}, ${{VAR:-default}}, ${{VAR-default}}, ${{VAR:?error}} or ${{VAR?error}}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(s: &str) -> (Result<String, Problem>, Vec<String>) {
        let env: HashMap<&str, &str> = HashMap::from([("A", "alpha"), ("EMPTY", ""), ("N", "3")]);
        let lookup = |k: &str| env.get(k).map(|v| v.to_string());
        let mut unset = Vec::new();
        (interpolate(s, &lookup, &mut unset), unset)
    }

    fn ok(s: &str) -> String {
        run(s).0.unwrap()
    }

    #[test]
    fn forms() {
        assert_eq!(ok("plain"), "plain");
        assert_eq!(ok("$A-${A}.$N"), "alpha-alpha.3");
        assert_eq!(ok("${A}x"), "alphax");
        assert_eq!(ok("cost: $$5 and $${A}"), "cost: $5 and ${A}");
        assert_eq!(ok("${UNSET:-dflt}"), "dflt");
        assert_eq!(ok("${EMPTY:-dflt}"), "dflt");
        assert_eq!(ok("${EMPTY-dflt}"), "");
        assert_eq!(ok("${UNSET-dflt}"), "dflt");
        assert_eq!(ok("${UNSET:-${A}/x}"), "alpha/x");
        assert_eq!(ok("${A:?must}"), "alpha");
        assert_eq!(ok("${EMPTY?must}"), "");
        assert_eq!(ok("${A:+on}"), "on");
        assert_eq!(ok("${EMPTY:+on}"), "");
        assert_eq!(ok("${EMPTY+on}"), "on");
        assert_eq!(ok("${UNSET+on}"), "");
        assert_eq!(ok("a_$A_b"), "a_");
    }

    #[test]
    fn unset_variables_are_blank_and_reported_once() {
        let (r, unset) = run("$NOPE ${NOPE} ${OTHER}");
        assert_eq!(r.unwrap(), "  ");
        assert_eq!(unset, ["NOPE", "OTHER"]);
    }

    #[test]
    fn errors() {
        assert_eq!(run("${EMPTY:?set it}").0, Err(Problem::Missing { var: "EMPTY".into(), message: "set it".into() }));
        assert_eq!(run("${UNSET?}").0, Err(Problem::Missing { var: "UNSET".into(), message: String::new() }));
        for bad in ["${A", "${}", "$ x", "$1", "${A!x}", "${1A}", "price $"] {
            assert!(matches!(run(bad).0, Err(Problem::Invalid(_))), "{bad}");
        }
    }
}
