//! Host-side plumbing for test networks.

use std::process::Command;

/// On hosts where Docker set the FORWARD policy to DROP (and br_netfilter
/// sends bridged frames through it), frames between our test hosts would be
/// dropped. Insert an accept rule scoped to our bridge when such a chain
/// exists; returns whether a rule was added.
pub fn allow_bridge_forwarding(bridge: &str) -> bool {
    let comment = format!("shoal-test-{bridge}");
    Command::new("nft")
        .args(["insert", "rule", "ip", "filter", "FORWARD", "iifname", bridge, "accept", "comment", &comment])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Removes the rule [`allow_bridge_forwarding`] added; returns whether
/// there was one.
pub fn remove_bridge_forwarding(bridge: &str) -> bool {
    let comment = format!("shoal-test-{bridge}");
    let Ok(out) = Command::new("nft").args(["-a", "list", "chain", "ip", "filter", "FORWARD"]).output() else {
        return false;
    };
    let mut removed = false;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.contains(&comment)
            && let Some(handle) = line.rsplit("handle ").next().map(str::trim)
        {
            removed |= Command::new("nft")
                .args(["delete", "rule", "ip", "filter", "FORWARD", "handle", handle])
                .output()
                .is_ok_and(|o| o.status.success());
        }
    }
    removed
}

/// Runs `f` on a new thread that has entered network namespace `netns`
/// (a netlink or TCP socket belongs to the namespace of the thread that
/// opened it), and returns its result.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("opening {path}: {e}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| anyhow::anyhow!("entering {path}: {e}"))?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in {netns} panicked"))?
}
