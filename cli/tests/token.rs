//! `caskade token` as an operator runs it: the binary, a secret file, and
//! its exit status and output.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn caskade_token(secret_file: &std::path::Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caskade"))
        .arg("token")
        .arg("--secret-file")
        .arg(secret_file)
        .args(["--role", "writer"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn an_empty_prefix_is_refused_at_issuance() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt-secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();

    // An empty prefix would cover every key: a clear error, no token.
    let refused = caskade_token(&secret, &["--prefix", ""]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "exit status {}", refused.status);
    assert!(refused.stdout.is_empty(), "printed {:?}", refused.stdout);
    assert!(stderr.contains("--prefix"), "{stderr}");
    assert!(stderr.contains("empty"), "{stderr}");

    // A real prefix, or none at all, signs a token.
    for extra in [&["--prefix", "tenant-a/"][..], &[]] {
        let issued = caskade_token(&secret, extra);
        assert!(issued.status.success(), "{extra:?}: {}", issued.status);
        let token = String::from_utf8(issued.stdout).unwrap();
        assert_eq!(token.trim().split('.').count(), 3, "{token}");
    }
}
