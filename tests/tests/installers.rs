//! The systemd units of `installers/systemd`: valid (`systemd-analyze verify`, with the
//! binaries they start) and hardened (`systemd-analyze security --offline=yes`: an exposure of
//! 2.0 or below; each unit file says why what remains exposed stays).

use std::path::Path;
use std::process::Command;

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
