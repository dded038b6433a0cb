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

/// A Debian host booted with systemd as its init (`systemd-nspawn --boot` on a root from
/// `scripts/debian-root.sh --systemd`), sharing this machine's network: its services listen on
/// and reach 127.0.0.1 like the test's own processes. Commands run in it through `nsenter`
/// (as root, or as `it`, an administrator with sudo rights like the one docs/install.md is
/// written for). Powered off when dropped.
pub struct BootedHost {
    pub root: PathBuf,
    nspawn: std::process::Child,
    /// The host's PID 1 (systemd), as this machine sees it.
    init: u32,
}

impl BootedHost {
    /// Unpacks `tarball` into `dir` and boots it; returns once systemd has finished starting
    /// the host (`systemctl is-system-running --wait`). Its console goes to `dir`.log.
    pub fn boot(tarball: &str, dir: &Path, name: &str) -> BootedHost {
        let root = new_host(tarball, dir);
        std::fs::write(root.join("etc/hostname"), format!("{name}\n")).unwrap();
        std::fs::write(root.join("etc/hosts"), format!("127.0.0.1 localhost\n127.0.1.1 {name}\n")).unwrap();
        std::fs::write(root.join("etc/sudoers.d/it"), "it ALL=(ALL) NOPASSWD: ALL\n").unwrap();
        let console = std::fs::File::create(dir.with_extension("log")).unwrap();
        let nspawn = Command::new("systemd-nspawn")
            .arg("--directory")
            .arg(&root)
            .args(["--boot", "--register=no", "--keep-unit", "--quiet", "--console=read-only"])
            .arg(format!("--machine={name}"))
            .stdin(std::process::Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .unwrap_or_else(|e| panic!("systemd-nspawn: {e}"));
        let mut host = BootedHost { root, init: 0, nspawn };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        host.init = loop {
            let init = children_of(host.nspawn.id())
                .into_iter()
                .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "systemd"));
            if let Some(init) = init {
                break init;
            }
            if let Ok(Some(status)) = host.nspawn.try_wait() {
                panic!("systemd-nspawn ended ({status}): {}", host.console());
            }
            assert!(std::time::Instant::now() < deadline, "{name} did not boot: {}", host.console());
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        // systemd's own socket first (systemctl cannot wait without it), then the boot's end:
        // "running", or "degraded" with the units that failed (none is expected of this base).
        while !host.sh("test -S /run/systemd/private").status.success() {
            assert!(std::time::Instant::now() < deadline, "{name}: systemd never listened: {}", host.console());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let state = host.sh("systemctl is-system-running --wait");
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        assert_eq!(
            state,
            "running",
            "{name} booted {state}: {}",
            host.run("systemctl --no-pager --failed; journalctl --no-pager -b -p warning")
        );
        host.run("useradd --create-home --shell /bin/sh it");
        host
    }

    /// The host's PID 1 (systemd), as this machine sees it: what `nsenter --target` takes.
    pub fn init_pid(&self) -> u32 {
        self.init
    }

    /// What the host's console printed.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.root.with_extension("log")).unwrap_or_default()
    }

    fn command(&self, user: &str, script: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("--target").arg(self.init.to_string()).args(["--all", "--", "/usr/bin/env", "-i"]).args([
            "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
            "TERM=dumb",
        ]);
        if user == "root" {
            cmd.args(["HOME=/root", "/bin/sh", "-c", &format!("cd /root && {script}")]);
        } else {
            cmd.args(["/usr/sbin/runuser", "--login", user, "-c", script]);
        }
        cmd
    }

    /// `sh -c script` as root in the host; its output.
    pub fn sh(&self, script: &str) -> std::process::Output {
        let mut cmd = self.command("root", script);
        cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    /// [`BootedHost::sh`] that must succeed; what it printed.
    pub fn run(&self, script: &str) -> String {
        run(&mut self.command("root", script))
    }

    /// `script` in a login shell of `it` (an administrator: `sudo` works for it), in its home
    /// folder; the output, successful or not.
    pub fn as_it(&self, script: &str) -> std::process::Output {
        let mut cmd = self.command("it", script);
        cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    /// `it`'s home folder, as this machine sees it.
    pub fn home(&self) -> PathBuf {
        self.root.join("home/it")
    }

    /// A property of a unit (`systemctl show --value -p NAME UNIT`).
    pub fn unit_property(&self, unit: &str, name: &str) -> String {
        self.run(&format!("systemctl show --value -p {name} {unit}")).trim().to_owned()
    }
}

impl Drop for BootedHost {
    fn drop(&mut self) {
        // SIGTERM makes systemd-nspawn ask the host's systemd to power off.
        let _ = Command::new("kill").args(["-TERM", &self.nspawn.id().to_string()]).status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // "pid (comm) state ppid …": the command may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{p}/stat")).ok().and_then(|s| {
                let rest = s.rsplit_once(") ")?.1;
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            }) == Some(pid)
        })
        .collect()
}
