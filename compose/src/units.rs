//! The value syntaxes compose files share with Docker: Go durations
//! (`1m30s`), byte sizes (`64M`), CPU counts (`0.5`), and shell words
//! (`command: echo "a b"`).

use std::time::Duration;

/// A Go duration: one or more `NUMBER UNIT` (`ns`, `us`/`µs`, `ms`, `s`,
/// `m`, `h`), e.g. `1m30s`, `1.5s`, `500ms`; or `0`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let secs = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * secs;
    }
    if !total.is_finite() || total > 1e12 {
        return None;
    }
    Some(Duration::from_secs_f64(total))
}

/// A size in bytes as Docker reads one (`RAMInBytes`): a number with an
/// optional unit `b`, `k`, `m`, `g`, `t`, `p` (powers of 1024), optionally
/// followed by `b` or `ib`, any case: `64M`, `1g`, `512kb`, `1.5GiB`, `4096`.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let num_len = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    if num_len == 0 {
        return None;
    }
    let n: f64 = t[..num_len].parse().ok()?;
    let unit = t[num_len..].trim_start().to_ascii_lowercase();
    let unit = unit.strip_suffix('b').unwrap_or(&unit);
    let unit = unit.strip_suffix('i').unwrap_or(unit);
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return None,
    };
    // `ib` alone (no letter before it) is not a unit.
    if unit.is_empty() && t[num_len..].to_ascii_lowercase().trim_start() == "ib" {
        return None;
    }
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return None;
    }
    Some(bytes as u64)
}

/// CPUs as nano-CPUs: `0.5` → 500_000_000; `0` means no limit.
pub fn parse_cpus(s: &str) -> Option<u64> {
    let v: f64 = s.trim().parse().ok()?;
    if !v.is_finite() || !(0.0..=1e6).contains(&v) {
        return None;
    }
    Some((v * 1e9).round() as u64)
}

/// Splits a command line into words as a POSIX shell would, without
/// expanding anything: whitespace separates words, single quotes keep
/// everything, double quotes keep everything but `\"`, `\\`, `\$` and
/// `` \` ``, and a backslash outside quotes keeps the next character.
pub fn split_words(s: &str) -> Result<Vec<String>, &'static str> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => word.push(c),
                        None => return Err("unterminated single quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                word.push('\\');
                                word.push(c);
                            }
                            None => return Err("unterminated double quote"),
                        },
                        Some(c) => word.push(c),
                        None => return Err("unterminated double quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') => {}
                    Some(c) => word.push(c),
                    None => return Err("a backslash at the end"),
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// One word quoted for `sh -c` (left bare when that is safe).
pub fn shell_quote(w: &str) -> String {
    let safe = !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if safe { w.to_string() } else { format!("'{}'", w.replace('\'', r"'\''")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ms = |s: &str| parse_duration(s).map(|d| d.as_millis());
        assert_eq!(ms("1m30s"), Some(90_000));
        assert_eq!(ms("500ms"), Some(500));
        assert_eq!(ms("1.5s"), Some(1500));
        assert_eq!(ms("2h"), Some(7_200_000));
        assert_eq!(ms("0"), Some(0));
        assert_eq!(ms("10us"), Some(0));
        for bad in ["", "10", "s", "-1s", "1x", "1m30", "1 s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("512kb"), Some(512 << 10));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("10 m"), Some(10 << 20));
        for bad in ["", "M", "-1M", "12Q", "abc", "1ib"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0.5"), Some(500_000_000));
        assert_eq!(parse_cpus("2"), Some(2_000_000_000));
        assert_eq!(parse_cpus("-1"), None);
        assert_eq!(parse_cpus("x"), None);
    }

    #[test]
    fn words() {
        assert_eq!(split_words(r#"sh -c 'echo "hi there"; exit 0'"#).unwrap(), ["sh", "-c", r#"echo "hi there"; exit 0"#]);
        assert_eq!(split_words(r#"a "b \"c\" \n" d\ e ''"#).unwrap(), ["a", r#"b "c" \n"#, "d e", ""]);
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert!(split_words("echo 'oops").is_err());
        assert!(split_words("echo \"oops").is_err());
    }

    #[test]
    fn quoting_round_trips_through_split() {
        let args = ["wget", "-q", "-O", "-", "http://x:8080/a b", "it's", ""];
        let line: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
        assert_eq!(split_words(&line.join(" ")).unwrap(), args);
    }
}
