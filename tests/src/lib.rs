//! Support for ActiDash's end-to-end tests and demo: a realistic data generator with an
//! independent reference of the expected metrics ([`generator`]), and a harness that runs the
//! real binaries as processes ([`harness`]).

pub mod dataset;
pub mod generator;
pub mod harness;
pub mod hosts;
pub mod kube;
pub mod reference;

/// The Kafka bootstrap servers the test script started, if any.
///
/// Tests that need Kafka call this: without `ACTIDASH_KAFKA_BOOTSTRAP` they are skipped with a
/// message, unless `ACTIDASH_REQUIRE_SERVICES=1` (set by `scripts/test.sh`), where a missing
/// broker is an error: the suite never passes by skipping silently.
pub fn kafka_bootstrap(test: &str) -> Option<String> {
    service("ACTIDASH_KAFKA_BOOTSTRAP", test, "start Kafka with scripts/kafka.sh")
}

/// The 3-broker cluster the test script started for failover tests, and the folder of its
/// brokers' pid files (`broker-N/pid`).
pub fn kafka_cluster(test: &str) -> Option<(String, std::path::PathBuf)> {
    let bootstrap = service("ACTIDASH_KAFKA3_BOOTSTRAP", test, "scripts/test.sh starts a 3-broker cluster")?;
    let dir = std::env::var("ACTIDASH_KAFKA3_DIR").ok()?;
    Some((bootstrap, dir.into()))
}

/// The PostgreSQL admin URL the test script started (`scripts/db.sh`), on the same terms as
/// [`kafka_bootstrap`].
pub fn postgres_admin(test: &str) -> Option<String> {
    service("ACTIDASH_PG_URL", test, "start the servers with scripts/db.sh")
}

/// Debian's chromium for the browser tests (`ACTIDASH_CHROMIUM`, set by `scripts/test.sh`
/// after installing it), on the same terms as [`kafka_bootstrap`].
pub fn chromium(test: &str) -> Option<String> {
    service("ACTIDASH_CHROMIUM", test, "install Debian's chromium (scripts/test.sh does)")
}

/// The desktop app's test needs Xvfb and WebKitGTK (`ACTIDASH_DESKTOP=1`, set by
/// `scripts/test.sh` after installing them), on the same terms as [`kafka_bootstrap`].
pub fn desktop(test: &str) -> Option<String> {
    service("ACTIDASH_DESKTOP", test, "install xvfb, imagemagick and WebKitGTK 4.1 (scripts/ui.sh desktop does)")
}

/// tauri-driver for the desktop app's WebDriver test (`ACTIDASH_TAURI_DRIVER`, set by
/// `scripts/test.sh` after installing it and Debian's WebKitWebDriver), on the same terms as
/// [`kafka_bootstrap`].
pub fn tauri_driver(test: &str) -> Option<String> {
    service("ACTIDASH_TAURI_DRIVER", test, "scripts/ui.sh desktop installs tauri-driver and WebKitWebDriver")
}

/// Prometheus's `promtool` (`ACTIDASH_PROMTOOL`, set by `scripts/test.sh` after installing
/// Debian's `prometheus`), on the same terms as [`kafka_bootstrap`].
pub fn promtool(test: &str) -> Option<String> {
    service("ACTIDASH_PROMTOOL", test, "install Debian's prometheus package (scripts/test.sh does)")
}

/// tmux, for tests of live terminal views (`ACTIDASH_TMUX`, set by `scripts/test.sh` after
/// installing Debian's tmux), on the same terms as [`kafka_bootstrap`].
pub fn tmux(test: &str) -> Option<String> {
    service("ACTIDASH_TMUX", test, "install Debian's tmux (scripts/test.sh does)")
}

/// systemd's `systemd-analyze` (`ACTIDASH_SYSTEMD_ANALYZE`, set by `scripts/test.sh`), for the
/// checks of the systemd units, on the same terms as [`kafka_bootstrap`].
pub fn systemd_analyze(test: &str) -> Option<String> {
    service("ACTIDASH_SYSTEMD_ANALYZE", test, "install Debian's systemd (scripts/test.sh does)")
}

/// A minimal Debian root file system as a tarball (`ACTIDASH_DEBIAN_ROOT`, made and cached by
/// `scripts/debian-root.sh`, which `scripts/test.sh` runs after installing lintian, rpm and
/// debootstrap), for the packaging tests, on the same terms as [`kafka_bootstrap`].
pub fn debian_root(test: &str) -> Option<String> {
    service(
        "ACTIDASH_DEBIAN_ROOT",
        test,
        "scripts/test.sh installs lintian, rpm and debootstrap and runs scripts/debian-root.sh",
    )
}

/// The same Debian root with systemd as its init (`ACTIDASH_DEBIAN_SYSTEMD_ROOT`, made by
/// `scripts/debian-root.sh --systemd`), booted by `systemd-nspawn` (Debian's
/// systemd-container, which `scripts/test.sh` installs), on the same terms as [`kafka_bootstrap`].
pub fn debian_systemd_root(test: &str) -> Option<String> {
    service(
        "ACTIDASH_DEBIAN_SYSTEMD_ROOT",
        test,
        "scripts/test.sh installs systemd-container and runs scripts/debian-root.sh --systemd",
    )
}

/// The folder of `ansible-playbook` and `ansible-lint` (`ACTIDASH_ANSIBLE`, a virtual
/// environment `scripts/test.sh` makes), on the same terms as [`kafka_bootstrap`].
pub fn ansible(test: &str) -> Option<String> {
    service(
        "ACTIDASH_ANSIBLE",
        test,
        "scripts/test.sh installs Ansible and ansible-lint from PyPI into a virtual environment",
    )
}

/// kustomize (`ACTIDASH_KUSTOMIZE`, built by `scripts/test.sh`), on the same terms as
/// [`kafka_bootstrap`].
pub fn kustomize(test: &str) -> Option<String> {
    service("ACTIDASH_KUSTOMIZE", test, "scripts/test.sh builds kustomize from the Go module proxy")
}

/// The folder of `kube-apiserver`, `kubectl` and `etcd` (`ACTIDASH_KUBERNETES`, built by
/// `scripts/test.sh` from the Go module proxy), on the same terms as [`kafka_bootstrap`].
pub fn kubernetes(test: &str) -> Option<String> {
    service("ACTIDASH_KUBERNETES", test, "scripts/test.sh builds kube-apiserver, kubectl and etcd")
}

/// Debian's `buildah` (`ACTIDASH_BUILDAH`, installed by `scripts/test.sh`), to build and run
/// the container image, on the same terms as [`kafka_bootstrap`].
pub fn buildah(test: &str) -> Option<String> {
    service("ACTIDASH_BUILDAH", test, "scripts/test.sh installs Debian's buildah")
}

/// Groovy's jar (`ACTIDASH_GROOVY_JAR`, fetched from Maven Central by `scripts/test.sh`), to
/// check the Jenkinsfile's syntax, on the same terms as [`kafka_bootstrap`].
pub fn groovy_jar(test: &str) -> Option<String> {
    service("ACTIDASH_GROOVY_JAR", test, "scripts/test.sh fetches Groovy from Maven Central")
}

fn service(var: &str, test: &str, how: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(b) if !b.is_empty() => Some(b),
        _ => {
            assert!(
                std::env::var("ACTIDASH_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{test}: {var} is not set but ACTIDASH_REQUIRE_SERVICES=1; {how}"
            );
            eprintln!("{test}: skipped: {var} is not set (run scripts/test.sh, which starts it)");
            None
        }
    }
}

/// A new, empty PostgreSQL database named `name` (dropped first if it exists) on the server of
/// `admin`; returns its URL.
pub fn fresh_postgres_database(admin: &str, name: &str) -> anyhow::Result<String> {
    let mut client = postgres::Client::connect(admin, postgres::NoTls)?;
    // One statement per call: a multi-statement batch would run in one transaction.
    client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
    client.batch_execute(&format!("CREATE DATABASE {name}"))?;
    let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
    Ok(format!("{base}/{name}"))
}

/// docs/install.md, the guide the installers' tests run as written.
pub fn install_guide() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/install.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of the first shell block of docs/install.md after `heading`, without their
/// comments (`  # …`) and blank lines: what an operator types.
pub fn install_guide_lines(heading: &str) -> Vec<String> {
    let doc = install_guide();
    let section = doc.split_once(heading).unwrap_or_else(|| panic!("no {heading:?} in docs/install.md")).1;
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .unwrap_or_else(|| panic!("no shell block after {heading:?} in docs/install.md"))
        .0;
    block
        .lines()
        .map(|l| l.split_once("  #").map_or(l, |(command, _comment)| command).trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}
