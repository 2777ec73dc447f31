//! The confinement flags `shoal run` and `service create/update` share:
//! `--cap-add`, `--cap-drop`, `--security-opt`, `--ulimit`. Each value is
//! checked here, with the same rules the managers and the runtime apply
//! (`shoal-confine`), so a bad one fails before anything is sent.

use anyhow::{Context, bail};
use shoal_confine::{Profile, caps, ulimit};

/// `--security-opt` values to the seccomp setting: `""` (Docker's default
/// profile), `"unconfined"`, or a profile read from a file (JSON, checked).
/// `no-new-privileges` is accepted (shoal always sets it); anything that
/// would weaken that or names a module shoal doesn't drive is refused.
pub fn seccomp_from_opts(opts: &[String]) -> anyhow::Result<Option<String>> {
    let mut seccomp = None;
    for o in opts {
        let (k, v) = o.split_once(['=', ':']).unwrap_or((o.as_str(), ""));
        match (k, v) {
            ("seccomp", "unconfined") => seccomp = Some("unconfined".to_string()),
            ("seccomp", "") => bail!("invalid --security-opt {o:?}: expected seccomp=unconfined or seccomp=PROFILE.json"),
            ("seccomp", "builtin" | "default") => seccomp = Some(String::new()),
            ("seccomp", path) => {
                let json = std::fs::read_to_string(path).with_context(|| format!("--security-opt {o}: reading the profile"))?;
                Profile::from_json(&json).with_context(|| format!("--security-opt {o}"))?;
                seccomp = Some(json);
            }
            ("no-new-privileges", "" | "true") => {}
            ("no-new-privileges", "false") => {
                bail!("invalid --security-opt {o:?}: shoal always sets no_new_privs; it can't be turned off")
            }
            _ => bail!("unsupported --security-opt {o:?}: shoal takes seccomp=unconfined|PROFILE.json and no-new-privileges"),
        }
    }
    Ok(seccomp)
}

/// Checks capability names (NET_ADMIN, CAP_NET_ADMIN, ALL), returning
/// them in the `CAP_` form.
pub fn cap_names(flag: &str, names: &[String]) -> anyhow::Result<Vec<String>> {
    names
        .iter()
        .map(|n| caps::normalize(n).map(str::to_string).with_context(|| format!("invalid --{flag}")))
        .collect()
}

/// Applies `--cap-add`/`--cap-drop` onto the lists as Docker's `service
/// update` does: adding a capability takes it off the drop list and the
/// other way round.
pub fn apply_caps(add: &[String], drop: &[String], cap_add: &mut Vec<String>, cap_drop: &mut Vec<String>) -> anyhow::Result<()> {
    for c in cap_names("cap-add", add)? {
        cap_drop.retain(|d| *d != c);
        if !cap_add.contains(&c) {
            cap_add.push(c);
        }
    }
    for c in cap_names("cap-drop", drop)? {
        cap_add.retain(|d| *d != c);
        if !cap_drop.contains(&c) {
            cap_drop.push(c);
        }
    }
    Ok(())
}

/// `--ulimit` values, checked; a name given twice is refused.
pub fn ulimits(values: &[String]) -> anyhow::Result<Vec<ulimit::Ulimit>> {
    let mut out: Vec<ulimit::Ulimit> = Vec::new();
    for v in values {
        let u = ulimit::parse(v).context("invalid --ulimit")?;
        if out.iter().any(|o| o.name == u.name) {
            bail!("invalid --ulimit {v:?}: {} is set twice", u.name);
        }
        out.push(u);
    }
    Ok(out)
}
