//! The Ansible roles of `ansible/`: `ansible-lint` (production profile) finds nothing, and the
//! playbook runs for real against hosts this test makes — Debian root file systems reached with
//! the chroot connection of the `ansible` package's community.general collection: the cloud
//! installed by its role and two agents installed, configured and enrolled by theirs ship and
//! count every record; a second run changes nothing.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use actidash_tests::generator::{Feed, Generator, Line, expected_totals};
use actidash_tests::harness::{Deployment, append_lines, wait_until};
use actidash_tests::hosts::{chroot, new_host, package, run, start_as_service};
use serde_json::json;

/// `ansible-playbook` of the repository's `site.yml` with `inventory`; its output.
fn playbook(ansible: &str, inventory: &Path, limit: Option<&str>) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible");
    let mut cmd = Command::new(format!("{ansible}/ansible-playbook"));
    cmd.arg("-i").arg(inventory).arg("playbooks/site.yml").current_dir(&dir);
    cmd.env("ANSIBLE_CONFIG", dir.join("ansible.cfg")).env("ANSIBLE_NOCOLOR", "1").env("ANSIBLE_FORCE_COLOR", "0");
    cmd.env("PATH", format!("{ansible}:{}", std::env::var("PATH").unwrap_or_default()));
    if let Some(limit) = limit {
        cmd.args(["--limit", limit]);
    }
    let started = Instant::now();
    let out = run(&mut cmd);
    eprintln!(
        "ansible-playbook{}: {:.1} s",
        limit.map(|l| format!(" --limit {l}")).unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    out
}

/// The PLAY RECAP's `changed=` of each host.
fn changed(output: &str) -> Vec<(String, u32)> {
    let recap = output.rsplit_once("PLAY RECAP").map_or("", |(_, r)| r);
    recap
        .lines()
        .filter_map(|l| {
            let (host, counts) = l.split_once(" : ")?;
            let n = counts.split_whitespace().find_map(|c| c.strip_prefix("changed="))?.parse().ok()?;
            Some((host.trim().to_owned(), n))
        })
        .collect()
}

#[test]
fn the_roles_pass_ansible_lint_and_install_a_cloud_and_agents_that_count_every_record() {
    let test = "the_roles_pass_ansible_lint_and_install_a_cloud_and_agents_that_count_every_record";
    let (Some(ansible), Some(debian_root)) = (actidash_tests::ansible(test), actidash_tests::debian_root(test)) else {
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ansible");
    let lint = run(Command::new(format!("{ansible}/ansible-lint"))
        .args(["--profile", "production", "playbooks/site.yml", "roles", "inventory"])
        .current_dir(&dir)
        .env("PATH", format!("{ansible}:{}", std::env::var("PATH").unwrap_or_default()))
        .env("NO_COLOR", "1"));
    assert!(lint.contains("Profile 'production' was required, and it passed"), "{lint}");

    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ansible");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let packages = package(&work.join("packages"), "0.1.0", false);
    let deb = |prefix: &str| {
        packages.iter().find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).unwrap().clone()
    };
    let hosts: Vec<(&str, std::path::PathBuf)> =
        ["cloud", "shop1", "shop2"].iter().map(|h| (*h, new_host(&debian_root, &work.join("hosts").join(h)))).collect();
    let root_of = |name: &str| hosts.iter().find(|(h, _)| *h == name).unwrap().1.clone();

    // The deployment's certificates (dev-certs) and ports; the cloud itself is the role's.
    let d = Deployment::new(&work.join("deploy"), None).unwrap();
    let certs = d.root.join("certs");
    let read = |p: &str| std::fs::read_to_string(certs.join(p)).unwrap();
    let inventory = |tokens: Option<(&str, &str)>| {
        let mut onprem_hosts = serde_json::Map::new();
        for (i, name) in ["shop1", "shop2"].iter().enumerate() {
            let mut host = json!({ "ansible_host": root_of(name) });
            if let Some(t) = tokens {
                host["edge_agent_enroll_token"] = json!(if i == 0 { t.0 } else { t.1 });
            }
            onprem_hosts.insert((*name).to_owned(), host);
        }
        let inventory = json!({
            "all": {
                "vars": { "ansible_connection": "community.general.chroot" },
                "children": {
                    "cloud": { "hosts": { "cloud": {
                        "ansible_host": root_of("cloud"),
                        "cloud_aggregator_package": deb("actidash-cloud_"),
                        "cloud_aggregator_gateway_cert_pem": read("gateway.pem"),
                        "cloud_aggregator_gateway_key_pem": read("gateway.key"),
                        "cloud_aggregator_gateway_listen": format!("127.0.0.1:{}", d.gateway_port),
                        "cloud_aggregator_serve_listen": format!("127.0.0.1:{}", d.api_port),
                        "cloud_aggregator_heartbeat_interval_ms": 1000,
                        "cloud_aggregator_manage_service": false,
                    } } },
                    "onprem": {
                        "vars": {
                            "edge_agent_package": deb("actidash-agent_"),
                            "edge_agent_tenant": "acme",
                            "edge_agent_gateway_address": format!("127.0.0.1:{}", d.gateway_port),
                            "edge_agent_gateway_server_name": "localhost",
                            "edge_agent_gateway_ca_pem": read("ca.pem"),
                            "edge_agent_sources_toml": Feed::Orders.source_toml(Path::new("/srv/shop")),
                            "edge_agent_manage_service": false,
                        },
                        "hosts": onprem_hosts,
                    },
                },
            }
        });
        let path = work.join("inventory.json");
        std::fs::write(&path, serde_json::to_vec_pretty(&inventory).unwrap()).unwrap();
        path
    };

    // The cloud first: its gateway must be up for the agents to enroll.
    playbook(&ansible, &inventory(None), Some("cloud"));
    let cloud_root = root_of("cloud");
    let mut cloud = start_as_service(
        "cloud",
        &cloud_root,
        &["/usr/bin/cloud-aggregator", "run", "--config", "/etc/actidash/cloud.toml"],
        &work.join("cloud.log"),
    );
    d.wait_ready(Duration::from_secs(120)).unwrap();
    let cli = |args: &[&str]| {
        let mut all = vec!["--userspec=actidash:actidash".to_owned(), cloud_root.to_string_lossy().into_owned()];
        all.extend(["/usr/bin/cloud-aggregator".to_owned()]);
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let out = Command::new("chroot").args(&all).env("ACTIDASH_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "cloud-aggregator {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (t1, t2) = (cli(&["token", "create", "--tenant", "acme"]), cli(&["token", "create", "--tenant", "acme"]));
    let api = cli(&["api-token", "create", "--all-tenants", "--role", "admin", "--expires", "never"]);
    std::fs::write(d.root.join("api-token"), &api).unwrap();

    // Everything: the cloud again (unchanged), the agents installed, configured and enrolled.
    let first = playbook(&ansible, &inventory(Some((&t1, &t2))), None);
    let counts = changed(&first);
    assert!(counts.iter().any(|(h, n)| h == "cloud" && *n == 0), "the cloud was already in place: {counts:?}");
    assert!(counts.iter().filter(|(h, n)| h.starts_with("shop") && *n > 0).count() == 2, "{counts:?}");
    // Their services, as systemd would start them; records on each host.
    let mut g = Generator::new(17, 0);
    let mut all: Vec<Line> = Vec::new();
    let mut agents = Vec::new();
    for shop in ["shop1", "shop2"] {
        let root = root_of(shop);
        let lines: Vec<Line> = (0..200).map(|_| g.line_for(Feed::Orders, chrono::Utc::now())).collect();
        std::fs::create_dir_all(root.join("srv/shop")).unwrap();
        append_lines(&root.join("srv/shop"), &lines).unwrap();
        all.extend(lines);
        let agent = start_as_service(shop, &root, &["/usr/bin/edge-agent", "run"], &work.join(format!("{shop}.log")));
        assert!(chroot(&root, &["test", "-s", "/var/lib/actidash/identity/current"]).status().unwrap().success());
        agents.push(agent);
    }
    let expected = expected_totals(&all);
    wait_until(Duration::from_secs(120), "the cloud to count both agents' orders", || Ok(d.totals()? == expected))
        .unwrap_or_else(|e| panic!("{e:#}; see the logs in {}", work.display()));

    // Idempotent: a second run changes nothing anywhere (no second enrollment either).
    let second = playbook(&ansible, &inventory(Some((&t1, &t2))), None);
    let counts = changed(&second);
    assert_eq!(counts.len(), 3, "{second}");
    assert!(counts.iter().all(|(_, n)| *n == 0), "a second run changed something: {counts:?}\n{second}");
    for mut agent in agents {
        assert!(agent.terminate(Duration::from_secs(30)));
    }
    assert!(cloud.terminate(Duration::from_secs(30)));
    let _ = std::fs::remove_dir_all(work.join("hosts"));
}
