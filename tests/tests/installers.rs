//! The systemd units of `installers/systemd`: valid (`systemd-analyze verify`, with the
//! binaries they start) and hardened (`systemd-analyze security --offline=yes`: an exposure of
//! 2.0 or below; each unit file says why what remains exposed stays).

use std::path::Path;
use std::process::Command;

use actidash_tests::hosts::{chroot, new_host, package, run, start_as_service, uid_of};
use actidash_tests::{install_guide, install_guide_lines};

/// The exposure `systemd-analyze security` gives a unit ("Overall exposure level for …: 1.4").
fn exposure(report: &str) -> Option<f64> {
    let line = report.lines().find(|l| l.contains("Overall exposure level"))?;
    line.rsplit_once(": ")?.1.split_whitespace().next()?.parse().ok()
}

#[test]
fn the_systemd_units_are_valid_and_hardened() {
    let test = "the_systemd_units_are_valid_and_hardened";
    let Some(analyze) = actidash_tests::systemd_analyze(test) else { return };
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../installers/systemd");
    let bins = actidash_tests::harness::bin_dir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(&units).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if !name.ends_with(".service") {
            continue;
        }
        // The packages install the binaries in /usr/bin; here they are the ones just built. A
        // template is checked as one of its instances.
        let text = std::fs::read_to_string(units.join(&name)).unwrap();
        let text = text.replace("/usr/bin/", &format!("{}/", bins.display()));
        let instance = name.replace("@.service", "@gateway.service");
        let path = dir.path().join(&instance);
        std::fs::write(&path, text).unwrap();

        let out = Command::new(&analyze).arg("verify").arg(&path).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify {name}: {said}");

        let out = Command::new(&analyze).args(["security", "--offline=yes"]).arg(&path).output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        let score = exposure(&report).unwrap_or_else(|| panic!("no exposure level for {name}: {report}"));
        assert!(score <= 2.0, "{name}: exposure {score} (at most 2.0):\n{report}");
        checked.push((name, score));
    }
    checked.sort_by(|a, b| a.0.cmp(&b.0));
    let names: Vec<&str> = checked.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["actidash-agent.service", "actidash-cloud.service", "actidash-cloud@.service"], "{checked:?}");
}

#[test]
fn the_exposure_is_read_from_the_report() {
    let report = "✓ UMask=  Files created by service are accessible only by service's own user\n\n→ Overall exposure level for actidash-agent.service: 1.4 OK 🙂\n";
    assert_eq!(exposure(report), Some(1.4));
    assert_eq!(exposure("nothing"), None);
}

/// The allocator settings the agent's unit gives it are ones glibc knows, in effect with the
/// values the unit writes: glibc ignores a misspelt name or an out-of-range value without a
/// word, and its loader, given the same environment, lists the values it took.
#[test]
fn the_agents_allocator_settings_are_in_effect() {
    let env = actidash_tests::harness::agent_unit_environment();
    let tunables = env.iter().find(|(name, _)| name == "GLIBC_TUNABLES").map(|(_, v)| v.as_str());
    let tunables = tunables.expect("the agent's unit sets GLIBC_TUNABLES");
    let out = Command::new("/lib64/ld-linux-x86-64.so.2")
        .arg("--list-tunables")
        .env("GLIBC_TUNABLES", tunables)
        .output()
        .unwrap();
    assert!(out.status.success(), "ld.so --list-tunables: {}", String::from_utf8_lossy(&out.stderr));
    let listed = String::from_utf8_lossy(&out.stdout);
    let settings: Vec<&str> = tunables.split(':').collect();
    assert_eq!(settings.len(), 3, "{tunables}");
    for setting in settings {
        let (name, value) = setting.split_once('=').unwrap_or_else(|| panic!("{setting}: not name=value"));
        let line = listed
            .lines()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("{name}: not a glibc tunable"));
        // "glibc.malloc.arena_max: 0x2 (min: 0x1, max: 0xffffffffffffffff)"
        let shown = line.split_whitespace().nth(1).unwrap();
        let shown = shown.strip_prefix("0x").map_or_else(|| shown.parse(), |hex| u64::from_str_radix(hex, 16)).unwrap();
        assert_eq!(shown, value.parse::<u64>().unwrap(), "{setting}, listed as: {line}");
    }
}

#[test]
fn a_units_environment_is_read_from_its_environment_lines() {
    let unit = "[Service]\n# Environment=NOT=this\nEnvironment=A=1:b=2\nEnvironment=C=x D=y=z\nExecStart=/bin/true\n";
    let env = actidash_tests::harness::unit_environment(unit);
    let pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(pairs, [("A", "1:b=2"), ("C", "x"), ("D", "y=z")]);
}

/// The agent's .deb installed, configured, enrolled with the one line IT pastes, run, upgraded
/// (keeping its spool, positions, enrollment and changed configuration), removed (keeping its
/// state) and purged, with dpkg in a Debian chroot; lintian finds no error in either package;
/// the cloud's .deb, the .rpm and the tarball's install.sh are checked too.
#[test]
fn the_packages_install_upgrade_remove_and_purge_for_real() {
    use std::os::unix::fs::MetadataExt as _;
    let test = "the_packages_install_upgrade_remove_and_purge_for_real";
    let Some(debian_root) = actidash_tests::debian_root(test) else { return };
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("packages");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();

    let (v1, v2) = packages();
    let (agent_v1, cloud_v1, agent_v2) =
        (find(v1, "actidash-agent_", ".deb"), find(v1, "actidash-cloud_", ".deb"), find(v2, "actidash-agent_", ".deb"));

    // lintian: no error and no warning in either package.
    for deb in [&agent_v1, &cloud_v1] {
        let out = Command::new("lintian")
            .args(["--fail-on", "error,warning", "--tag-display-limit", "0"])
            .arg(deb)
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "lintian {}:\n{said}", deb.display());
        assert!(!said.lines().any(|l| l.starts_with("E:")), "lintian {}:\n{said}", deb.display());
    }

    // The .rpm: contents, configuration marked as such, the user made before install.
    let rpm = find(v1, "actidash-agent-", ".rpm");
    let listed = run(Command::new("rpm").args(["-qlp"]).arg(&rpm));
    for path in ["/usr/bin/edge-agent", "/usr/lib/systemd/system/actidash-agent.service", "/etc/actidash/agent.toml"] {
        assert!(listed.lines().any(|l| l == path), "{path} not in the rpm: {listed}");
    }
    assert_eq!(run(Command::new("rpm").args(["-qcp"]).arg(&rpm)).trim(), "/etc/actidash/agent.toml");
    assert!(run(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm)).contains("useradd -r -g actidash"));

    // A Debian host of its own.
    let root = new_host(&debian_root, &work.join("root"));
    for deb in [&agent_v1, &agent_v2, &cloud_v1] {
        std::fs::copy(deb, root.join("tmp").join(deb.file_name().unwrap())).unwrap();
    }
    let in_root = |p: &Path| format!("/tmp/{}", p.file_name().unwrap().to_string_lossy());
    let timed = |what: &str, cmd: &mut Command| {
        let started = std::time::Instant::now();
        let said = run(cmd);
        eprintln!("{what}: {:.2} s", started.elapsed().as_secs_f64());
        said
    };

    // Install.
    timed("install actidash-agent", &mut chroot(&root, &["dpkg", "-i", &in_root(&agent_v1)]));
    let uid = uid_of(&root, "actidash").expect("the actidash user exists");
    let state = root.join("var/lib/actidash");
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700), "state owned by the service's user, private");
    let conf = std::fs::metadata(root.join("etc/actidash/agent.toml")).unwrap();
    assert_eq!(conf.mode() & 0o777, 0o640);
    for path in [
        "usr/bin/edge-agent",
        "lib/systemd/system/actidash-agent.service",
        "usr/share/man/man1/edge-agent.1.gz",
        "usr/share/bash-completion/completions/edge-agent",
        "usr/share/doc/actidash-agent/copyright",
        "etc/systemd/system/multi-user.target.wants/actidash-agent.service",
    ] {
        assert!(root.join(path).symlink_metadata().is_ok(), "{path} missing after install");
    }
    assert!(run(&mut chroot(&root, &["edge-agent", "--version"])).contains("edge-agent 0.1.0"));

    // Configured by IT, enrolled with one line, run as its service would (its user).
    let d = actidash_tests::harness::Deployment::new(&work.join("deploy"), None).unwrap();
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(std::time::Duration::from_secs(120)).unwrap();
    std::fs::copy(d.root.join("certs/ca.pem"), root.join("etc/actidash/gateway-ca.pem")).unwrap();
    let shop = root.join("srv/shop");
    std::fs::create_dir_all(&shop).unwrap();
    let config = format!(
        "agent_id = \"pkg-agent\"\ntenant = \"acme\"\ndata_dir = \"/var/lib/actidash\"\n\n[cloud]\naddress = \"127.0.0.1:{}\"\n\
         server_name = \"localhost\"\nca_file = \"/etc/actidash/gateway-ca.pem\"\n\n{}",
        d.agent_port,
        actidash_tests::generator::Feed::Orders.source_toml(Path::new("/srv/shop"))
    );
    std::fs::write(root.join("etc/actidash/agent.toml"), &config).unwrap();
    // docs/install.md's lines, in its order: check with a preview, enroll, (start), status.
    let mut g = actidash_tests::generator::Generator::new(5, 0);
    let mut lines: Vec<actidash_tests::generator::Line> =
        (0..300).map(|_| g.line_for(actidash_tests::generator::Feed::Orders, chrono::Utc::now())).collect();
    actidash_tests::harness::append_lines(&shop, &lines).unwrap();
    let said = run(Command::new("chroot")
        .arg("--userspec=actidash:actidash")
        .arg(&root)
        .args(["edge-agent", "check", "--preview", "5"])
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"));
    assert!(
        said.contains("/etc/actidash/agent.toml: OK (1 sources)") && said.contains("source orders: 5 events, 0 bad"),
        "{said}"
    );
    let token = d.create_token("acme", "10m").unwrap();
    std::fs::write(root.join("root/token.txt"), &token).unwrap();
    let url = format!("actidash://127.0.0.1:{}", d.gateway_tcp_port);
    let said = run(&mut chroot(&root, &["edge-agent", "enroll", "--url", &url, "--token-file", "/root/token.txt"]));
    assert!(said.contains("enrolled pkg-agent for tenant acme"), "{said}");
    let identity = state.join("identity");
    assert_eq!(std::fs::metadata(identity.join("current")).unwrap().uid(), uid, "the identity is the service user's");
    let identity_files = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
            })
            .collect();
        files.sort();
        files
    };
    let enrolled = identity_files(&identity);

    let start_agent =
        |name: &str| start_as_service(name, &root, &["/usr/bin/edge-agent", "run"], &work.join(format!("{name}.log")));
    let converge = |lines: &[actidash_tests::generator::Line]| {
        let expected = actidash_tests::generator::expected_totals(lines);
        actidash_tests::harness::wait_until(
            std::time::Duration::from_secs(120),
            "the cloud to count the packaged agent's orders",
            || Ok(d.totals()? == expected),
        )
        .unwrap_or_else(|e| {
            panic!("{e:#}; agent log: {}", std::fs::read_to_string(work.join("agent.log")).unwrap_or_default())
        });
    };
    let mut agent = start_agent("agent");
    converge(&lines);
    actidash_tests::harness::wait_until(
        std::time::Duration::from_secs(30),
        "edge-agent status to show the link",
        || {
            let out = chroot(&root, &["edge-agent", "status", "--once"]).output()?;
            Ok(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("agent   connected (quic)"))
        },
    )
    .unwrap();
    assert!(agent.terminate(std::time::Duration::from_secs(30)), "the agent stops cleanly on SIGTERM");

    // Upgrade: the changed configuration, the enrollment, the spool and its positions stay.
    timed(
        "upgrade actidash-agent 0.1.0 -> 0.1.1",
        &mut chroot(&root, &["dpkg", "--force-confold", "-i", &in_root(&agent_v2)]),
    );
    assert_eq!(run(&mut chroot(&root, &["dpkg-query", "-W", "-f=${Version}", "actidash-agent"])), "0.1.1");
    assert_eq!(
        std::fs::read_to_string(root.join("etc/actidash/agent.toml")).unwrap(),
        config,
        "the changed file is kept"
    );
    assert_eq!(identity_files(&identity), enrolled, "the enrollment is kept");
    assert!(state.join("spool.db").exists());
    let more: Vec<actidash_tests::generator::Line> =
        (0..200).map(|_| g.line_for(actidash_tests::generator::Feed::Orders, chrono::Utc::now())).collect();
    actidash_tests::harness::append_lines(&shop, &more).unwrap();
    lines.extend(more);
    let mut agent = start_agent("agent");
    // Every order counted once: nothing read again, nothing skipped, no new enrollment.
    converge(&lines);
    assert!(agent.terminate(std::time::Duration::from_secs(30)));

    // Remove keeps the state and the configuration; purge deletes them, and the user.
    timed("remove actidash-agent", &mut chroot(&root, &["dpkg", "-r", "actidash-agent"]));
    assert!(!root.join("usr/bin/edge-agent").exists());
    assert!(identity.join("current").exists() && state.join("spool.db").exists(), "remove keeps the state");
    assert!(root.join("etc/actidash/agent.toml").exists(), "remove keeps the configuration");
    timed("purge actidash-agent", &mut chroot(&root, &["dpkg", "-P", "actidash-agent"]));
    assert!(!state.exists(), "purge deletes the state");
    assert!(!root.join("etc/actidash/agent.toml").exists(), "purge deletes the configuration");
    assert_eq!(uid_of(&root, "actidash"), None, "purge deletes the user");
    assert!(!root.join("etc/systemd/system/multi-user.target.wants/actidash-agent.service").exists());

    // The cloud's package: its units are installed, none enabled (the operator picks one
    // process or one service per role), the dashboards are in place.
    timed("install actidash-cloud", &mut chroot(&root, &["dpkg", "-i", &in_root(&cloud_v1)]));
    for path in [
        "usr/bin/cloud-aggregator",
        "lib/systemd/system/actidash-cloud.service",
        "lib/systemd/system/actidash-cloud@.service",
        "usr/share/man/man1/cloud-aggregator.1.gz",
        "etc/actidash/cloud.toml",
    ] {
        assert!(root.join(path).exists(), "{path} missing");
    }
    assert!(!root.join("etc/systemd/system/multi-user.target.wants/actidash-cloud.service").exists());
    timed("purge actidash-cloud", &mut chroot(&root, &["dpkg", "-P", "actidash-cloud"]));
    assert!(!root.join("usr/bin/cloud-aggregator").exists());

    // The tarball's install.sh: into a prefix, twice; a changed configuration is kept.
    let tarball = find(v1, "actidash-0.1.0-linux-", ".tar.gz");
    let unpacked = work.join("tarball");
    std::fs::create_dir_all(&unpacked).unwrap();
    run(Command::new("tar").arg("-xzf").arg(&tarball).arg("-C").arg(&unpacked));
    let prefix = work.join("prefix");
    let install = unpacked.join("actidash-0.1.0/install.sh");
    run(Command::new(&install).arg("--prefix").arg(&prefix).arg("agent"));
    assert!(
        prefix.join("usr/bin/edge-agent").exists() && prefix.join("lib/systemd/system/actidash-agent.service").exists()
    );
    std::fs::write(prefix.join("etc/actidash/agent.toml"), "# mine\n").unwrap();
    let said = run(Command::new(&install).arg("--prefix").arg(&prefix).arg("agent"));
    assert!(said.contains("kept your /etc/actidash/agent.toml"), "{said}");
    assert_eq!(std::fs::read_to_string(prefix.join("etc/actidash/agent.toml")).unwrap(), "# mine\n");
    assert!(prefix.join("etc/actidash/agent.toml.new").exists());
    assert!(cloud.terminate(std::time::Duration::from_secs(15)));
    let _ = std::fs::remove_dir_all(&root);
}

/// The Jenkinsfile (the seed's CI/CD): valid Groovy (compiled by Groovy's own compiler, offline;
/// a Jenkins server's declarative linter cannot run here), and its stages call the README's test
/// command and the packaging script, and archive the packages.
#[test]
fn the_jenkinsfile_compiles_and_calls_the_readme_commands() {
    let Some(groovy) = actidash_tests::groovy_jar("the_jenkinsfile_compiles_and_calls_the_readme_commands") else {
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(repo.join("Jenkinsfile")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("Jenkinsfile.groovy");
    std::fs::write(&source, &text).unwrap();
    run(Command::new("java")
        .arg("-cp")
        .arg(&groovy)
        .arg("org.codehaus.groovy.tools.FileSystemCompiler")
        .arg("-d")
        .arg(dir.path().join("classes"))
        .arg(&source));
    // A syntax error is caught: the check can fail.
    std::fs::write(&source, text.replacen('}', "", 1)).unwrap();
    let broken = Command::new("java")
        .arg("-cp")
        .arg(&groovy)
        .arg("org.codehaus.groovy.tools.FileSystemCompiler")
        .arg("-d")
        .arg(dir.path().join("broken"))
        .arg(&source)
        .output()
        .unwrap();
    assert!(!broken.status.success(), "a Jenkinsfile missing a brace compiles?");

    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    assert!(readme.contains("scripts/test.sh"), "the README's test command");
    for needed in ["sh 'scripts/test.sh'", "scripts/package.sh", "archiveArtifacts", "target/packages/*.deb"] {
        assert!(text.contains(needed), "the Jenkinsfile lacks {needed}");
    }
}

/// The packages of this build: 0.1.0 (with the .rpm) and 0.1.1 (to upgrade to), made once for
/// the tests of this file.
fn packages() -> &'static (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    static PACKAGES: std::sync::OnceLock<(Vec<std::path::PathBuf>, Vec<std::path::PathBuf>)> =
        std::sync::OnceLock::new();
    PACKAGES.get_or_init(|| {
        let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("package-builds");
        let _ = std::fs::remove_dir_all(&work);
        (package(&work.join("v1"), "0.1.0", true), package(&work.join("v2"), "0.1.1", false))
    })
}

/// The package in `set` whose file name starts with `prefix` and ends with `suffix`.
fn find(set: &[std::path::PathBuf], prefix: &str, suffix: &str) -> std::path::PathBuf {
    set.iter()
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .unwrap_or_else(|| panic!("no {prefix}…{suffix} in {set:?}"))
        .clone()
}

#[test]
fn the_install_guide_is_read_without_its_comments() {
    let agent = install_guide_lines("## The agent, on an on-prem host (IT)");
    assert_eq!(agent.first().map(String::as_str), Some("sudo dpkg -i actidash-agent_0.1.0_amd64.deb"));
    assert!(agent.iter().any(|l| l == "sudo systemctl enable --now actidash-agent"), "{agent:?}");
    let cloud = install_guide_lines("## The cloud side (ops)");
    assert!(cloud.iter().all(|l| !l.contains('#') && !l.contains("agent_id")), "{cloud:?}");
}

/// docs/install.md's two blocks run line by line, as written, by an administrator (`it`, with
/// sudo) on two Debian hosts booted with systemd: the cloud's (package, certificate, its
/// configuration's listen addresses, `systemctl enable --now`, tokens, `status`) and the
/// agent's (package, configuration, CA, preview, enrollment with the cloud's token,
/// `systemctl enable --now`, `status`). Then what the units promise, under a real systemd:
/// the agent runs as `actidash` without privileges or capabilities under a seccomp filter; a
/// crash is restarted after `RestartSec`; an upgrade restarts it on the new binary; a stop is
/// clean (exit 0, well within the unit's timeout); remove stops it. Every order is counted
/// once by the cloud's service throughout.
#[test]
fn the_install_guide_runs_on_hosts_booted_with_systemd() {
    use actidash_tests::generator::{Feed, Generator, Line, expected_totals};
    use actidash_tests::harness::{Deployment, append_lines, free_tcp_port, free_udp_port, wait_until};
    use actidash_tests::hosts::BootedHost;
    use std::time::Duration;
    let test = "the_install_guide_runs_on_hosts_booted_with_systemd";
    let Some(booting_root) = actidash_tests::debian_systemd_root(test) else { return };
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("booted");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let (v1, v2) = packages();
    let certs = work.join("certs");
    run(Command::new(actidash_tests::harness::bin("cloud-aggregator").unwrap())
        .args(["dev-certs", "--out"])
        .arg(&certs));
    let expect_ok = |host: &BootedHost, line: &str| -> String {
        let out = host.as_it(line);
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "`{line}` failed on {}: {said}", host.root.display());
        eprintln!("$ {line}\n{said}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // The cloud's host, by the guide's block for ops.
    let cloud = BootedHost::boot(&booting_root, &work.join("cloud-host"), "actidash-cloud-host");
    for file in [find(v1, "actidash-cloud_", ".deb"), certs.join("gateway.pem"), certs.join("gateway.key")] {
        std::fs::copy(&file, cloud.home().join(file.file_name().unwrap())).unwrap();
    }
    let (gateway_port, api_port, metrics_port) = (free_udp_port(), free_tcp_port(), free_tcp_port());
    let (mut enrollment_token, mut viewer_token) = (String::new(), String::new());
    for line in install_guide_lines("## The cloud side (ops)") {
        if line == "sudoedit /etc/actidash/cloud.toml" {
            let path = cloud.root.join("etc/actidash/cloud.toml");
            let shipped = std::fs::read_to_string(&path).unwrap();
            for (from, _) in [("0.0.0.0:4433", ""), ("127.0.0.1:8080", ""), ("127.0.0.1:9464", "")] {
                assert!(shipped.contains(from), "the shipped cloud.toml has no {from}");
            }
            let edited = shipped
                .replace("0.0.0.0:4433", &format!("127.0.0.1:{gateway_port}"))
                .replace("127.0.0.1:8080", &format!("127.0.0.1:{api_port}"))
                .replace("127.0.0.1:9464", &format!("127.0.0.1:{metrics_port}"));
            std::fs::write(&path, edited).unwrap();
            continue;
        }
        let line = if line.ends_with("cloud-aggregator status") { format!("{line} --once") } else { line };
        let said = expect_ok(&cloud, &line);
        if line.contains(" token create ") {
            enrollment_token = said.trim().to_owned();
        } else if line.contains(" api-token create ") {
            viewer_token = said.trim().to_owned();
        } else if line.contains("systemctl enable --now") {
            assert_eq!(cloud.unit_property("actidash-cloud", "ActiveState"), "active");
            wait_until(Duration::from_secs(60), "the cloud's API to answer", || {
                Ok(actidash_tests::harness::http_get(api_port, "/readyz").is_ok())
            })
            .unwrap();
        } else if line.ends_with("status --once") {
            assert!(
                said.contains(&format!("127.0.0.1:{metrics_port}/metrics")) && !said.contains("UNREACHABLE"),
                "{said}"
            );
        }
    }
    assert!(!enrollment_token.is_empty() && !viewer_token.is_empty(), "the guide made no tokens");
    // The cloud's API, as the dashboards read it, with the viewer token the guide made.
    let api = {
        let mut d = Deployment::new(&work.join("api"), None).unwrap();
        d.api_port = api_port;
        std::fs::write(d.root.join("api-token"), &viewer_token).unwrap();
        d
    };

    // The agent's host, by the guide's block for IT.
    let agent = BootedHost::boot(&booting_root, &work.join("agent-host"), "actidash-agent-host");
    for file in [find(v1, "actidash-agent_", ".deb"), find(v2, "actidash-agent_", ".deb")] {
        std::fs::copy(&file, agent.home().join(file.file_name().unwrap())).unwrap();
    }
    std::fs::copy(certs.join("ca.pem"), agent.home().join("gateway-ca.pem")).unwrap();
    std::fs::write(agent.home().join("token.txt"), &enrollment_token).unwrap();
    let shop = agent.root.join("srv/shop");
    std::fs::create_dir_all(&shop).unwrap();
    let mut g = Generator::new(11, 0);
    let mut orders = |n: usize| -> Vec<Line> { (0..n).map(|_| g.line_for(Feed::Orders, chrono::Utc::now())).collect() };
    let mut lines = orders(300);
    append_lines(&shop, &lines).unwrap();
    let converge = |lines: &[Line], when: &str| {
        let expected = expected_totals(lines);
        wait_until(Duration::from_secs(120), &format!("the cloud to count every order {when}"), || {
            Ok(api.totals()? == expected)
        })
        .unwrap_or_else(|e| panic!("{e:#}; {}", agent.run("journalctl --no-pager -u actidash-agent | tail -30")));
    };
    let agent_config = format!(
        "agent_id = \"booted-agent\"\ntenant = \"acme\"\ndata_dir = \"/var/lib/actidash\"\n\n[cloud]\n\
         address = \"127.0.0.1:{gateway_port}\"\nserver_name = \"localhost\"\nca_file = \"/etc/actidash/gateway-ca.pem\"\n\n{}",
        Feed::Orders.source_toml(Path::new("/srv/shop"))
    );
    for line in install_guide_lines("## The agent, on an on-prem host (IT)") {
        if line == "sudoedit /etc/actidash/agent.toml" {
            std::fs::write(agent.root.join("etc/actidash/agent.toml"), &agent_config).unwrap();
            continue;
        }
        let line = line.replace("gateway.example.com:4433", &format!("127.0.0.1:{gateway_port}"));
        let line = if line.ends_with("edge-agent status") { format!("{line} --once") } else { line };
        let said = expect_ok(&agent, &line);
        if line.contains("check --preview") {
            assert!(said.contains("source orders: 5 events, 0 bad"), "{said}");
        } else if line.contains("enroll") {
            assert!(said.contains("enrolled booted-agent for tenant acme"), "{said}");
        } else if line.contains("systemctl enable --now") {
            assert_eq!(agent.unit_property("actidash-agent", "ActiveState"), "active");
            converge(&lines, "after `systemctl enable --now`");
        } else if line.ends_with("status --once") {
            // Rewritten every 2 s: it may still be the one written before the first connection.
            assert!(said.starts_with("agent   "), "{said}");
            wait_until(Duration::from_secs(30), "edge-agent status to show the link", || {
                Ok(String::from_utf8_lossy(&agent.as_it(&line).stdout).contains("agent   connected (quic)"))
            })
            .unwrap();
        }
    }
    // The agent's journal has what it logged.
    assert!(agent.run("journalctl --no-pager -u actidash-agent").contains("edge-agent"));

    // Under systemd's hardening: its user, no privileges, no capabilities, a seccomp filter.
    let main_pid = agent.unit_property("actidash-agent", "MainPID");
    let status = agent.run(&format!("cat /proc/{main_pid}/status"));
    let uid = uid_of(&agent.root, "actidash").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")).map(|v| v.trim().to_owned()))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
    };
    assert_eq!(field("Uid").split_whitespace().next(), Some(uid.to_string().as_str()), "{status}");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!((field("CapEff"), field("CapBnd")), ("0000000000000000".into(), "0000000000000000".into()));
    assert_eq!(field("Seccomp"), "2", "a system call filter");
    // Its view of the file system is read-only outside its state folder.
    let writable = |path: &str| agent.sh(&format!("nsenter -t {main_pid} -m touch {path}")).status.success();
    for path in ["/etc/actidash/x", "/usr/bin/x", "/var/lib/x", "/home/it/x"] {
        assert!(!writable(path), "{path} is writable for the service");
    }
    assert!(writable("/var/lib/actidash/x"), "its state folder is not writable");
    agent.run("rm /var/lib/actidash/x");

    // A crash: restarted after RestartSec=2s (not before), nothing lost or counted twice.
    let started = |host: &BootedHost| host.unit_property("actidash-agent", "ExecMainStartTimestampMonotonic");
    let before = started(&agent).parse::<u64>().unwrap();
    agent.run(&format!("kill -KILL {main_pid}"));
    let killed_at = agent.run("cat /proc/uptime").split_whitespace().next().unwrap().parse::<f64>().unwrap();
    wait_until(Duration::from_secs(30), "systemd to restart the killed agent", || {
        Ok(agent.unit_property("actidash-agent", "NRestarts") == "1"
            && agent.unit_property("actidash-agent", "ActiveState") == "active")
    })
    .unwrap();
    let after = started(&agent).parse::<u64>().unwrap();
    assert!(after > before);
    assert!(after as f64 / 1e6 - killed_at >= 1.9, "restarted {} s after the kill", after as f64 / 1e6 - killed_at);
    let more = orders(200);
    append_lines(&shop, &more).unwrap();
    lines.extend(more);
    converge(&lines, "after a crash");

    // An upgrade while it runs: restarted on the new binary, its state kept.
    let upgrade_at = started(&agent);
    let upgraded = std::time::Instant::now();
    expect_ok(&agent, "sudo dpkg -i actidash-agent_0.1.1_amd64.deb");
    eprintln!("upgrade of the running agent: {:.2} s", upgraded.elapsed().as_secs_f64());
    assert_ne!(started(&agent), upgrade_at, "the upgrade restarted the service");
    assert_eq!(agent.unit_property("actidash-agent", "ActiveState"), "active");
    let pid = agent.unit_property("actidash-agent", "MainPID");
    // dpkg replaced the file: a process still on the old binary would show it "(deleted)".
    assert_eq!(agent.run(&format!("readlink /proc/{pid}/exe")).trim(), "/usr/bin/edge-agent");
    assert!(agent.run("dpkg-query -W -f='${Version}' actidash-agent").contains("0.1.1"));
    let more = orders(200);
    append_lines(&shop, &more).unwrap();
    lines.extend(more);
    converge(&lines, "after the upgrade");

    // A clean stop: SIGTERM, exit 0, well within TimeoutStopSec.
    let stopping = std::time::Instant::now();
    expect_ok(&agent, "sudo systemctl stop actidash-agent");
    let took = stopping.elapsed();
    eprintln!("systemctl stop actidash-agent: {:.2} s", took.as_secs_f64());
    assert_eq!(
        (agent.unit_property("actidash-agent", "Result"), agent.unit_property("actidash-agent", "ExecMainStatus")),
        ("success".to_owned(), "0".to_owned())
    );
    assert!(took < Duration::from_secs(30), "stopped in {took:?}, past TimeoutStopSec");
    // Remove stops a running service (and keeps its state).
    expect_ok(&agent, "sudo systemctl start actidash-agent");
    expect_ok(&agent, "sudo dpkg -r actidash-agent");
    assert_ne!(agent.unit_property("actidash-agent", "ActiveState"), "active");
    let running = agent.run("for p in /proc/[0-9]*; do readlink $p/exe; done 2>/dev/null | grep -c edge-agent || true");
    assert_eq!(running.trim(), "0", "an agent still runs after remove");
    assert!(agent.root.join("var/lib/actidash/identity/current").exists());

    // Without a package manager: purged, then the guide's tarball line, the same enrollment
    // (a new token) and systemctl lines. The purge took the identity and the positions: the
    // host comes back as a new agent (ids are never reused) with a source of its own.
    expect_ok(&agent, "sudo dpkg -P actidash-agent");
    assert!(!agent.root.join("var/lib/actidash").exists());
    let doc = install_guide();
    let tar_line = doc.split_once("`tar xzf").unwrap().1.split_once('`').unwrap().0;
    let tar_line = format!("tar xzf{}", tar_line.split_whitespace().fold(String::new(), |a, w| a + " " + w));
    let tarball = find(v1, "actidash-0.1.0-linux-", ".tar.gz");
    std::fs::copy(&tarball, agent.home().join(tarball.file_name().unwrap())).unwrap();
    expect_ok(&agent, &tar_line);
    let enroll = install_guide_lines("## The agent, on an on-prem host (IT)")
        .into_iter()
        .find(|l| l.contains("edge-agent enroll"))
        .unwrap()
        .replace("gateway.example.com:4433", &format!("127.0.0.1:{gateway_port}"));
    std::fs::write(
        agent.home().join("token.txt"),
        expect_ok(&cloud, "sudo -u actidash cloud-aggregator token create --tenant acme").trim(),
    )
    .unwrap();
    let shop2 = agent.root.join("srv/shop2");
    std::fs::create_dir_all(&shop2).unwrap();
    std::fs::write(
        agent.root.join("etc/actidash/agent.toml"),
        agent_config.replace("booted-agent", "booted-agent-2").replace("/srv/shop", "/srv/shop2"),
    )
    .unwrap();
    assert!(expect_ok(&agent, &enroll).contains("enrolled booted-agent-2"));
    expect_ok(&agent, "sudo systemctl enable --now actidash-agent");
    let more = orders(100);
    append_lines(&shop2, &more).unwrap();
    lines.extend(more);
    converge(&lines, "after a reinstall from the tarball");
    expect_ok(&agent, "sudo systemctl stop actidash-agent");

    expect_ok(&cloud, "sudo systemctl stop actidash-cloud");
    assert_eq!(cloud.unit_property("actidash-cloud", "Result"), "success");
}
