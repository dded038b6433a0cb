//! The Kubernetes manifests of `installers/kubernetes`: each overlay renders with kustomize and
//! passes `kubernetes-validate --strict` (the API's own schemas, offline); each overlay's
//! configuration is one the cloud accepts; processors never outnumber partitions; every
//! container runs as non-root on a read-only root with no capabilities, requests resources and
//! has probes. The container build file is checked for the same promises (no registry is
//! reachable here to build it).

use std::path::Path;
use std::process::Command;

use actidash_tests::hosts::run;

/// The documents of a rendered multi-document YAML file, as JSON values (read by PyYAML, which
/// the Ansible environment has).
fn documents(python: &str, file: &Path) -> Vec<serde_json::Value> {
    let json = run(Command::new(python)
        .arg("-c")
        .arg("import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))")
        .arg(file));
    serde_json::from_str(&json).unwrap()
}

#[test]
fn the_kubernetes_overlays_render_validate_and_keep_their_promises() {
    let test = "the_kubernetes_overlays_render_validate_and_keep_their_promises";
    let (Some(kustomize), Some(ansible)) = (actidash_tests::kustomize(test), actidash_tests::ansible(test)) else {
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../installers/kubernetes");
    let work = tempfile::tempdir().unwrap();
    for overlay in ["demo", "production"] {
        let rendered = run(Command::new(&kustomize).arg("build").arg(dir.join("overlays").join(overlay)));
        let file = work.path().join(format!("{overlay}.yaml"));
        std::fs::write(&file, &rendered).unwrap();
        let said = run(Command::new(format!("{ansible}/kubernetes-validate")).args(["--strict", "--quiet"]).arg(&file));
        assert!(!said.contains("ERROR") && !said.contains("WARN"), "kubernetes-validate {overlay}: {said}");

        // The configuration is one the cloud accepts.
        let config = dir.join("overlays").join(overlay).join("cloud.toml");
        run(Command::new(actidash_tests::harness::bin("cloud-aggregator").unwrap())
            .arg("check")
            .arg("--config")
            .arg(&config));
        let parsed: toml::Table = toml::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        let partitions = parsed["kafka"]["partitions"].as_integer().expect("Kafka in every overlay");
        let docs = documents(&format!("{ansible}/python"), &file);
        let kinds: Vec<(String, String)> = docs
            .iter()
            .map(|d| (d["kind"].as_str().unwrap().to_owned(), d["metadata"]["name"].as_str().unwrap().to_owned()))
            .collect();
        for (kind, name) in [
            ("Deployment", "actidash-gateway"),
            ("Deployment", "actidash-processor"),
            ("Deployment", "actidash-api"),
            ("Service", "actidash-gateway"),
            ("HorizontalPodAutoscaler", "actidash-gateway"),
        ] {
            assert!(kinds.iter().any(|(k, n)| k == kind && n == name), "{overlay}: no {kind} {name}: {kinds:?}");
        }
        let processor_hpa = docs
            .iter()
            .find(|d| d["kind"] == "HorizontalPodAutoscaler" && d["metadata"]["name"] == "actidash-processor")
            .unwrap();
        assert!(
            processor_hpa["spec"]["maxReplicas"].as_i64().unwrap() <= partitions,
            "{overlay}: more processors than the {partitions} partitions"
        );
        let gateway_service =
            docs.iter().find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "actidash-gateway").unwrap();
        let protocols: Vec<&str> = gateway_service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["protocol"].as_str().unwrap())
            .collect();
        assert_eq!(protocols, ["UDP", "TCP"], "QUIC and the TLS fallback");
        for deployment in docs.iter().filter(|d| d["kind"] == "Deployment") {
            let name = deployment["metadata"]["name"].as_str().unwrap();
            let pod = &deployment["spec"]["template"]["spec"];
            assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{overlay}/{name}");
            for c in pod["containers"].as_array().unwrap() {
                let sc = &c["securityContext"];
                assert_eq!(sc["readOnlyRootFilesystem"], true, "{overlay}/{name}");
                assert_eq!(sc["allowPrivilegeEscalation"], false, "{overlay}/{name}");
                assert_eq!(sc["capabilities"]["drop"][0], "ALL", "{overlay}/{name}");
                assert!(c["resources"]["requests"]["cpu"].is_string(), "{overlay}/{name} requests no CPU");
                assert!(c["readinessProbe"].is_object() && c["livenessProbe"].is_object(), "{overlay}/{name}: probes");
                let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
                assert!(args.windows(2).any(|w| w == ["--config", "/etc/actidash/config/cloud.toml"]), "{args:?}");
            }
        }
        // The API answers its probes on /healthz and /readyz.
        let api = docs.iter().find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "actidash-api").unwrap();
        let c = &api["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            (c["livenessProbe"]["httpGet"]["path"].as_str(), c["readinessProbe"]["httpGet"]["path"].as_str()),
            (Some("/healthz"), Some("/readyz"))
        );
    }

    // The container build file: two stages, the pinned toolchain, a non-root numeric user.
    let containerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../installers/container/Containerfile"))
            .unwrap();
    let toolchain =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../rust-toolchain.toml")).unwrap();
    let channel = toolchain.lines().find_map(|l| l.strip_prefix("channel = ")).unwrap().trim_matches('"');
    let minor = channel.rsplit_once('.').map_or(channel, |(mm, _)| mm);
    let froms: Vec<&str> = containerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage: {froms:?}");
    assert!(
        froms[0].contains(&format!("rust:{minor}-")),
        "the build stage uses the pinned toolchain {channel}: {froms:?}"
    );
    let user = containerfile.lines().rev().find_map(|l| l.strip_prefix("USER ")).expect("a USER");
    assert!(user.split(':').all(|id| id.parse::<u32>().is_ok_and(|n| n >= 1000)), "USER {user}: numeric, not root");
    assert!(!containerfile.lines().any(|l| l.starts_with("ADD ")), "COPY, never ADD");
    assert!(containerfile.contains("COPY --from=build /src/target/release/cloud-aggregator"));
}
