//! Env files: the `.env` beside the first compose file (variables for
//! interpolation) and a service's `env_file:` (its environment).
//!
//! One `KEY=VALUE` per line; blank lines and lines starting with `#` are
//! skipped; an `export ` prefix is allowed; a value wholly inside matching
//! single or double quotes loses them (nothing else is unescaped); `KEY`
//! alone means "take it from the environment".

use crate::error::ComposeError;

pub type Vars = Vec<(String, Option<String>)>;

pub fn parse(file: &str, text: &str) -> Result<Vars, ComposeError> {
    let mut vars = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let (key, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim_end(), Some(unquote(v))),
            None => (line.trim_end(), None),
        };
        let err = |reason| ComposeError::EnvFile { file: file.to_string(), line: i + 1, reason };
        if key.is_empty() {
            return Err(err("expected KEY=VALUE"));
        }
        if key.contains(char::is_whitespace) {
            return Err(err("a variable name cannot contain whitespace"));
        }
        vars.push((key.to_string(), value));
    }
    Ok(vars)
}

fn unquote(v: &str) -> String {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return v[1..v.len() - 1].to_string();
        }
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let text = "# comment\n\nA=1\nexport B =x\nC=\"quoted value\"\nD='single'\nE\nF=a=b\nG=\n";
        let v = parse(".env", text).unwrap();
        let got: Vec<(&str, Option<&str>)> = v.iter().map(|(k, v)| (k.as_str(), v.as_deref())).collect();
        assert_eq!(
            got,
            [
                ("A", Some("1")),
                ("B", Some("x")),
                ("C", Some("quoted value")),
                ("D", Some("single")),
                ("E", None),
                ("F", Some("a=b")),
                ("G", Some("")),
            ]
        );
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let e = parse("app.env", "A=1\nMY VAR=2\n").unwrap_err().to_string();
        assert_eq!(e, "app.env:2: invalid line in env file: a variable name cannot contain whitespace");
        let e = parse("app.env", "=2\n").unwrap_err().to_string();
        assert_eq!(e, "app.env:1: invalid line in env file: expected KEY=VALUE");
    }
}
