//! rlimits (`--ulimit`), as Docker names and writes them.

use crate::Error;

/// The rlimits a container may set (Docker's names).
pub const NAMES: [&str; 15] = [
    "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile", "nproc", "rss", "rtprio",
    "rttime", "sigpending", "stack",
];

/// One rlimit; -1 is unlimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ulimit {
    pub name: String,
    pub soft: i64,
    pub hard: i64,
}

/// Parses `nofile=1024:2048`, `nproc=512` (soft = hard) or `core=-1`.
pub fn parse(s: &str) -> Result<Ulimit, Error> {
    let bad = |why: &'static str| Error::Ulimit(s.to_string(), why);
    let (name, vals) = s.split_once('=').ok_or_else(|| bad("expected NAME=SOFT[:HARD]"))?;
    let num = |v: &str| v.trim().parse::<i64>().map_err(|_| bad("limits are whole numbers, -1 for unlimited"));
    let (soft, hard) = match vals.split_once(':') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => (num(vals)?, num(vals)?),
    };
    let u = Ulimit { name: name.trim().to_string(), soft, hard };
    check(&u).map_err(|e| match e {
        Error::Ulimit(_, why) => bad(why),
        other => other,
    })?;
    Ok(u)
}

/// Checks a limit however it arrived (CLI, compose file, gRPC).
pub fn check(u: &Ulimit) -> Result<(), Error> {
    let text = format!("{}={}:{}", u.name, u.soft, u.hard);
    let bad = |why: &'static str| Error::Ulimit(text.clone(), why);
    if !NAMES.contains(&u.name.as_str()) {
        return Err(bad("unknown name (core, cpu, data, fsize, locks, memlock, msgqueue, nice, nofile, nproc, rss, rtprio, rttime, sigpending, stack)"));
    }
    if u.soft < -1 || u.hard < -1 {
        return Err(bad("limits are 0 or more, or -1 for unlimited"));
    }
    if u.hard != -1 && (u.soft == -1 || u.soft > u.hard) {
        return Err(bad("the soft limit must not exceed the hard limit"));
    }
    if u.name == "nofile" && (u.soft == -1 || u.hard == -1) {
        return Err(bad("nofile can't be unlimited (the kernel caps it at fs.nr_open)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(parse("nofile=1024:2048").unwrap(), Ulimit { name: "nofile".into(), soft: 1024, hard: 2048 });
        assert_eq!(parse("nproc=64").unwrap(), Ulimit { name: "nproc".into(), soft: 64, hard: 64 });
        assert_eq!(parse("core=-1").unwrap().hard, -1);
        for (bad, why) in [
            ("nofile", "NAME=SOFT"),
            ("files=1", "unknown name"),
            ("nofile=2048:1024", "must not exceed"),
            ("nofile=x", "whole numbers"),
            ("nofile=-1", "can't be unlimited"),
            ("nproc=-5", "0 or more"),
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
