//! The CLI on its own, without a cluster.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use shoal_tests::shoal_bin;

#[test]
fn completion_scripts_for_each_shell() {
    for (shell, marker, flag) in
        [("bash", "complete -F", "--replicas"), ("zsh", "#compdef shoal", "--replicas"), ("fish", "complete -c shoal", "-l replicas")]
    {
        let out = Command::new(shoal_bin()).args(["completion", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains(marker), "{shell} script lacks {marker:?}");
        // Subcommands and their flags are in the script.
        assert!(text.contains("service") && text.contains(flag), "{shell} script lacks service create's flags");
    }
    let out = Command::new(shoal_bin()).args(["completion", "tcsh"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'tcsh'"));
    assert!(out.stdout.is_empty());
}
