//! The Kubernetes manifests of `installers/kubernetes`: each overlay renders with kustomize and
//! passes `kubernetes-validate --strict` (the API's own schemas, offline); each overlay's
//! configuration is one the cloud accepts; processors never outnumber partitions; every
//! container runs as non-root on a read-only root with no capabilities, requests resources and
//! has probes. docs/install.md's kubectl lines run against a real API server. The container
//! build file is checked for the same promises, and its image built with buildah and run.

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

/// docs/install.md's Kubernetes lines, as written, against a real API server (no nodes):
/// accepted with no warning (the namespace enforces the `restricted` Pod Security Standard, so
/// a non-compliant pod template would be warned about), every Secret and ConfigMap the
/// Deployments name exists with the keys they read, applying again changes nothing, and the
/// demo overlay is accepted too.
#[test]
fn the_install_guide_applies_to_a_kubernetes_api_server() {
    let test = "the_install_guide_applies_to_a_kubernetes_api_server";
    let Some(bin) = actidash_tests::kubernetes(test) else { return };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kubernetes");
    let _ = std::fs::remove_dir_all(&work);
    let api = actidash_tests::kube::KubeApi::start(Path::new(&bin), &work.join("server"));
    // The operator's folder: the repository's installers/ and the gateway's certificate.
    let cwd = work.join("ops");
    std::fs::create_dir_all(&cwd).unwrap();
    std::os::unix::fs::symlink(repo.join("installers"), cwd.join("installers")).unwrap();
    run(Command::new(actidash_tests::harness::bin("cloud-aggregator").unwrap()).args(["dev-certs", "--out"]).arg(&cwd));
    let lines = actidash_tests::install_guide_lines("### On Kubernetes");
    assert_eq!(lines.len(), 4, "{lines:?}");
    let kubectl = |line: &str| -> String {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[0], "kubectl", "{line}");
        let out = api.kubectl(&words[1..]).current_dir(&cwd).output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "`{line}`: {said}");
        assert!(!said.contains("Warning"), "`{line}` warned: {said}");
        said
    };
    for line in &lines {
        // The password is the operator's to choose.
        let said = kubectl(&line.replace("password=…", "password=s3cret"));
        eprintln!("$ {line}\n{said}");
    }

    // What the Deployments name exists, with the keys they read.
    let get = |what: &str| -> serde_json::Value {
        serde_json::from_str(&run(&mut api.kubectl(&["-n", "actidash", "get", what, "-o", "json"]))).unwrap()
    };
    let secrets = get("secrets");
    let configmaps = get("configmaps");
    let keys_of = |list: &serde_json::Value, name: &str| -> Vec<String> {
        let item = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in the namespace"));
        item["data"].as_object().map(|d| d.keys().cloned().collect()).unwrap_or_default()
    };
    let deployments = get("deployments");
    let mut names: Vec<&str> =
        deployments["items"].as_array().unwrap().iter().map(|d| d["metadata"]["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["actidash-api", "actidash-gateway", "actidash-processor"]);
    let mut checked = 0;
    for d in deployments["items"].as_array().unwrap() {
        let spec = &d["spec"]["template"]["spec"];
        for v in spec["volumes"].as_array().into_iter().flatten() {
            if let Some(name) = v["secret"]["secretName"].as_str() {
                let keys = keys_of(&secrets, name);
                for item in v["secret"]["items"].as_array().into_iter().flatten() {
                    assert!(keys.contains(&item["key"].as_str().unwrap().to_owned()), "{name} lacks {item}: {keys:?}");
                }
                checked += 1;
            }
            if let Some(name) = v["configMap"]["name"].as_str() {
                assert!(keys_of(&configmaps, name).contains(&"cloud.toml".to_owned()), "{name}");
                checked += 1;
            }
        }
        for c in spec["containers"].as_array().unwrap() {
            for e in c["env"].as_array().into_iter().flatten() {
                let r = &e["valueFrom"]["secretKeyRef"];
                if let Some(name) = r["name"].as_str() {
                    assert!(keys_of(&secrets, name).contains(&r["key"].as_str().unwrap().to_owned()), "{e}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 4, "the Deployments name {checked} Secrets and ConfigMaps");

    // Applying again changes nothing (no object gets a new resource version: kubectl still says
    // "configured" of the PodDisruptionBudgets, whose selector it always sends, as their
    // replace patch strategy has it). The demo overlay, into its own namespace.
    let versions = || -> Vec<(String, String)> {
        let list = get("serviceaccounts,configmaps,services,deployments,poddisruptionbudgets,horizontalpodautoscalers");
        let mut v: Vec<(String, String)> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                (
                    format!("{}/{}", i["kind"].as_str().unwrap(), i["metadata"]["name"].as_str().unwrap()),
                    i["metadata"]["resourceVersion"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = versions();
    assert!(before.len() >= 12, "{before:?}");
    kubectl(lines.last().unwrap());
    assert_eq!(versions(), before, "a second apply changed objects");
    kubectl("kubectl apply -f installers/kubernetes/overlays/demo/namespace.yaml");
    kubectl("kubectl apply -k installers/kubernetes/overlays/demo");
}

/// The image of `installers/container/Containerfile`, built with buildah (Debian's) and run.
/// No registry is reachable here, so the two images it starts from are stand-ins: its runtime
/// base `debian:bookworm-slim` is made from the same Debian release (debootstrap's minimal
/// root, `scripts/debian-root.sh`), and its build stage — the toolchain image compiling the
/// release binary — is replaced (`--build-context build=…`) by this build's binary and
/// dashboards at the paths that stage leaves them. Everything after is the file's own: its
/// packages, user, folders, ports, entry point. The image then runs a gateway and API whose
/// readiness is checked from outside, as user 10001.
#[test]
fn the_container_image_builds_and_runs_as_its_user() {
    let test = "the_container_image_builds_and_runs_as_its_user";
    let (Some(buildah), Some(debian_root)) = (actidash_tests::buildah(test), actidash_tests::debian_root(test)) else {
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("container");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let storage = |cmd: &mut Command| {
        cmd.arg("--root")
            .arg(work.join("storage"))
            .arg("--runroot")
            .arg(work.join("run"))
            .args(["--storage-driver", "vfs"]);
    };
    let buildah_cmd = |args: &[&str]| -> Command {
        let mut cmd = Command::new(&buildah);
        storage(&mut cmd);
        cmd.args(args);
        cmd
    };

    // The runtime base, from the Debian root.
    let base = run(&mut buildah_cmd(&["from", "scratch"])).trim().to_owned();
    run(buildah_cmd(&["add", &base]).arg(&debian_root).arg("/"));
    run(&mut buildah_cmd(&["commit", "-q", &base, "docker.io/library/debian:bookworm-slim"]));
    // What the build stage leaves: the release binary (here this build's, stripped) and the UI.
    let context = work.join("build-stage");
    let release = context.join("src/target/release");
    std::fs::create_dir_all(&release).unwrap();
    std::fs::copy(actidash_tests::harness::bin("cloud-aggregator").unwrap(), release.join("cloud-aggregator")).unwrap();
    run(Command::new("strip").arg(release.join("cloud-aggregator")));
    let ui = actidash_tests::harness::ui_dir().expect("the dashboards are built (scripts/ui.sh build)");
    std::fs::create_dir_all(context.join("src/desktop/ui")).unwrap();
    run(Command::new("cp").arg("-r").arg(&ui).arg(context.join("src/desktop/ui/dist")));

    let started = std::time::Instant::now();
    let said = run(buildah_cmd(&["bud", "--isolation", "chroot", "--pull=never", "--layers=false"])
        .arg(format!("--build-context=build={}", context.display()))
        .arg("-f")
        .arg(repo.join("installers/container/Containerfile"))
        .args(["-t", "actidash/cloud-aggregator:test"])
        .arg(&repo));
    eprintln!("image built in {:.1} s", started.elapsed().as_secs_f64());
    assert!(said.contains("Successfully tagged localhost/actidash/cloud-aggregator:test"), "{said}");
    let inspected: serde_json::Value =
        serde_json::from_str(&run(&mut buildah_cmd(&["inspect", "localhost/actidash/cloud-aggregator:test"]))).unwrap();
    let config = &inspected["OCIv1"]["config"];
    assert_eq!(config["User"], "10001:10001");
    assert_eq!(config["Entrypoint"], serde_json::json!(["/usr/bin/cloud-aggregator"]));
    for port in ["4433/udp", "4433/tcp", "8080/tcp"] {
        assert!(config["ExposedPorts"].get(port).is_some(), "{port} not exposed: {config}");
    }

    // Run it: a gateway and API on this machine's loopback, its configuration mounted where
    // the Kubernetes manifests mount theirs.
    let mounted = work.join("config");
    run(Command::new(actidash_tests::harness::bin("cloud-aggregator").unwrap())
        .args(["dev-certs", "--out"])
        .arg(&mounted));
    let (gateway, api) = (actidash_tests::harness::free_udp_port(), actidash_tests::harness::free_tcp_port());
    std::fs::write(
        mounted.join("cloud.toml"),
        format!(
            "data_dir = \"/var/lib/actidash\"\n[gateway]\nlisten = \"127.0.0.1:{gateway}\"\nlisten_tcp = \"127.0.0.1:{gateway}\"\n\
             cert_file = \"/etc/actidash/config/gateway.pem\"\nkey_file = \"/etc/actidash/config/gateway.key\"\n\
             [serve]\nlisten = \"127.0.0.1:{api}\"\nui_dir = \"/usr/share/actidash/ui\"\n"
        ),
    )
    .unwrap();
    run(Command::new("chmod").arg("-R").arg("a+rX").arg(&mounted));
    let container =
        run(&mut buildah_cmd(&["from", "-q", "localhost/actidash/cloud-aggregator:test"])).trim().to_owned();
    let mut args: Vec<String> = vec![
        "--root".into(),
        work.join("storage").display().to_string(),
        "--runroot".into(),
        work.join("run").display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
        "run".into(),
        "--isolation".into(),
        "chroot".into(),
        "-v".into(),
        format!("{}:/etc/actidash/config:ro", mounted.display()),
        container.clone(),
        "--".into(),
    ];
    // The image's entry point and command, as a pod would run them.
    args.extend(config["Entrypoint"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()));
    args.extend(config["Cmd"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut served =
        actidash_tests::harness::Process::start("image", Path::new(&buildah), &args, &work.join("image.log")).unwrap();
    actidash_tests::harness::wait_until(std::time::Duration::from_secs(60), "the image's API to be ready", || {
        Ok(actidash_tests::harness::http_get(api, "/readyz").is_ok())
    })
    .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(work.join("image.log")).unwrap_or_default()));
    let page = actidash_tests::harness::http_get(api, "/").unwrap();
    assert!(page.contains("<html") || page.contains("<!doctype html"), "the dashboards: {page:.200}");
    // Its processes run as the image's user.
    let uids: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let pid = e.ok()?.file_name().to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            cmdline.starts_with(b"/usr/bin/cloud-aggregator\0run\0--config\0/etc/actidash/config/").then(|| {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|u| u.split_whitespace().next().unwrap().to_owned())
            })?
        })
        .collect();
    assert_eq!(uids, ["10001"], "the image's server process and its user");
    served.terminate(std::time::Duration::from_secs(15));
    let _ = buildah_cmd(&["rm", "--all"]).output();
    let _ = std::fs::remove_dir_all(&work);
}
