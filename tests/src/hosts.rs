//! Hosts for the packaging and Ansible tests: Debian root file systems (from
//! [`crate::debian_root`]) used through `chroot`, and the packages built for them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs a command; its output, or a panic naming it with what it said.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed: {said}");
    said
}

/// `chroot ROOT args…`.
pub fn chroot(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("chroot");
    cmd.arg(root).args(args).env("DEBIAN_FRONTEND", "noninteractive").env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    cmd
}

/// Builds the packages of `version` from the test build into `out`; the paths printed.
pub fn package(out: &Path, version: &str, rpm: bool) -> Vec<PathBuf> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = crate::harness::bin_dir().unwrap().parent().unwrap().to_owned();
    let mut cmd = Command::new(repo.join("scripts/package.sh"));
    cmd.args(["--profile", "dev", "--no-build", "--version", version, "--out"])
        .arg(out)
        .env("CARGO_TARGET_DIR", &target);
    if !rpm {
        cmd.arg("--no-rpm");
    }
    run(&mut cmd).lines().filter(|l| l.starts_with('/')).map(PathBuf::from).collect()
}

pub fn uid_of(root: &Path, user: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&user)).then(|| f.get(2)?.parse().ok()).flatten()
    })
}

/// A new host: the Debian root tarball unpacked into `dir` (emptied first).
pub fn new_host(tarball: &str, dir: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    run(Command::new("tar").arg("-xzf").arg(tarball).arg("-C").arg(dir));
    dir.to_owned()
}

/// Runs `program args…` inside `root` as the `actidash` user (what its systemd unit's
/// `ExecStart` would run), logging to `log`.
pub fn start_as_service(name: &str, root: &Path, program_and_args: &[&str], log: &Path) -> crate::harness::Process {
    let root = root.to_str().expect("a UTF-8 path");
    let mut args = vec!["--userspec=actidash:actidash", root];
    args.extend_from_slice(program_and_args);
    crate::harness::Process::start(name, Path::new("/usr/sbin/chroot"), &args, log).unwrap()
}
