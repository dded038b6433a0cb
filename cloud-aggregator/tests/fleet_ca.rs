//! The fleet CA's first start: every process that opens the fleet (each role, `token create`)
//! may be the first, and they can start at the same moment on a new data folder. Exactly one
//! CA is made, its key and certificate belong together, and every process succeeds.

use std::process::{Command, Stdio};

#[test]
fn processes_starting_together_make_one_fleet_ca_whose_key_matches_its_certificate() {
    for round in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let config = dir.path().join("cloud.toml");
        std::fs::write(&config, format!("data_dir = \"{}\"\n", data.display())).unwrap();
        let children: Vec<_> = (0..6)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_cloud-aggregator"))
                    .args(["token", "create", "--tenant", "acme", "--config"])
                    .arg(&config)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut tokens = Vec::new();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "round {round}: {}", String::from_utf8_lossy(&out.stderr));
            tokens.push(String::from_utf8(out.stdout).unwrap().trim().to_owned());
        }
        tokens.sort();
        tokens.dedup();
        assert_eq!(tokens.len(), 6, "six distinct tokens");

        let fleet = data.join("fleet");
        let cert_pem = std::fs::read(fleet.join("ca.pem")).unwrap();
        let key_pem = std::fs::read_to_string(fleet.join("ca.key")).unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(&cert_pem).unwrap();
        let cert = pem.parse_x509().unwrap();
        let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
        assert_eq!(
            cert.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw(),
            "round {round}: the CA's key and certificate come from one process"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&fleet)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "round {round}: temporary files left: {leftovers:?}");
    }
}
