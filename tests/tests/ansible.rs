//! The Ansible roles of `ansible/`: `ansible-lint` (production profile) finds nothing, and
//! docs/install.md's Ansible lines run as written against hosts this test boots — Debian roots
//! under systemd (`systemd-nspawn`), reached with the nsenter connection of the `ansible`
//! package's community.docker collection: the cloud's role runs gateway, processor and API as
//! three services on Kafka and PostgreSQL, the agents' roles enroll them with tokens from a vault
//! and run their services, every record is counted; a second run changes nothing.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use actidash_tests::generator::{Feed, Generator, Line, expected_totals};
use actidash_tests::harness::{Deployment, append_lines, wait_until};
use actidash_tests::hosts::{BootedHost, package, run};
use serde_json::json;

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
fn the_roles_pass_ansible_lint_and_the_guide_installs_a_cloud_and_agents_that_count_every_record() {
    let test = "the_roles_pass_ansible_lint_and_the_guide_installs_a_cloud_and_agents_that_count_every_record";
    let (Some(ansible), Some(booting_root), Some(kafka), Some(pg_admin)) = (
        actidash_tests::ansible(test),
        actidash_tests::debian_systemd_root(test),
        actidash_tests::kafka_bootstrap(test),
        actidash_tests::postgres_admin(test),
    ) else {
        return;
    };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = format!("{ansible}:{}", std::env::var("PATH").unwrap_or_default());
    let lint = run(Command::new(format!("{ansible}/ansible-lint"))
        .args(["--profile", "production", "playbooks/site.yml", "roles", "inventory"])
        .current_dir(repo.join("ansible"))
        .env("PATH", &path)
        .env("NO_COLOR", "1"));
    assert!(lint.contains("Profile 'production' was required, and it passed"), "{lint}");

    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join("ansible");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let packages = package(&work.join("packages"), "0.1.0", false);
    let deb = |prefix: &str| {
        packages.iter().find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).unwrap().clone()
    };
    let hosts: Vec<(&str, BootedHost)> = ["cloud", "shop1", "shop2"]
        .iter()
        .map(|h| (*h, BootedHost::boot(&booting_root, &work.join("hosts").join(h), &format!("ansible-{h}"))))
        .collect();
    let host = |name: &str| &hosts.iter().find(|(h, _)| *h == name).unwrap().1;

    // The certificates (dev-certs) and ports; Kafka and PostgreSQL of the test command. The
    // cloud itself is its role's: three services.
    let d = Deployment::new(&work.join("deploy"), None).unwrap();
    let certs = d.root.join("certs");
    let read = |p: &str| std::fs::read_to_string(certs.join(p)).unwrap();
    let db = actidash_tests::fresh_postgres_database(&pg_admin, "ansible_guide").unwrap();
    let inventory_dir = work.join("inventory");
    std::fs::create_dir_all(&inventory_dir).unwrap();
    let inventory = inventory_dir.join("hosts.json");
    let onprem_hosts: serde_json::Map<String, serde_json::Value> = ["shop1", "shop2"]
        .iter()
        .map(|name| ((*name).to_owned(), json!({ "ansible_nsenter_pid": host(name).init_pid() })))
        .collect();
    let inventory_json = json!({
        "all": {
            "vars": { "ansible_connection": "community.docker.nsenter" },
            "children": {
                "cloud": { "hosts": { "cloud": {
                    "ansible_nsenter_pid": host("cloud").init_pid(),
                    "cloud_aggregator_package": deb("actidash-cloud_"),
                    "cloud_aggregator_roles": ["gateway", "process", "serve"],
                    "cloud_aggregator_gateway_cert_pem": read("gateway.pem"),
                    "cloud_aggregator_gateway_key_pem": read("gateway.key"),
                    "cloud_aggregator_gateway_listen": format!("127.0.0.1:{}", d.gateway_port),
                    "cloud_aggregator_serve_listen": format!("127.0.0.1:{}", d.api_port),
                    "cloud_aggregator_heartbeat_interval_ms": 1000,
                    "cloud_aggregator_kafka_bootstrap": kafka,
                    "cloud_aggregator_kafka_topic_prefix": d.topic_prefix,
                    "cloud_aggregator_kafka_group_id": format!("{}-processors", d.topic_prefix),
                    "cloud_aggregator_kafka_partitions": 3,
                    "cloud_aggregator_kafka_replication_factor": 1,
                    "cloud_aggregator_kafka_min_insync_replicas": 1,
                    "cloud_aggregator_store_url": db,
                    "cloud_aggregator_registry_url": db,
                } } },
                "onprem": {
                    "vars": {
                        "edge_agent_package": deb("actidash-agent_"),
                        "edge_agent_tenant": "acme",
                        "edge_agent_gateway_address": format!("127.0.0.1:{}", d.gateway_port),
                        "edge_agent_gateway_server_name": "localhost",
                        "edge_agent_gateway_ca_pem": read("ca.pem"),
                        "edge_agent_sources_toml": Feed::Orders.source_toml(Path::new("/srv/shop")),
                        // As in the example inventory: the tokens come from the vault.
                        "edge_agent_enroll_token": "{{ vault_enroll_tokens[inventory_hostname] }}",
                    },
                    "hosts": onprem_hosts,
                },
            },
        }
    });
    std::fs::write(&inventory, serde_json::to_vec_pretty(&inventory_json).unwrap()).unwrap();
    let vault_password = "correct horse battery staple";
    let password_file = work.join("vault-password");
    std::fs::write(&password_file, vault_password).unwrap();
    // `cloud-aggregator` on the cloud's host, as its user: what it printed on stdout.
    let cli = |args: &str| -> String {
        let out = host("cloud").sh(&format!("ACTIDASH_LOG=warn runuser -u actidash -- cloud-aggregator {args}"));
        assert!(out.status.success(), "cloud-aggregator {args}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };

    // docs/install.md's lines, as written, from the repository's ansible/ folder.
    let lines = actidash_tests::install_guide_lines("### With Ansible");
    assert_eq!(lines[0], "cd ansible");
    // A line in a shell, from ansible/; --ask-vault-pass reads the password from standard input
    // when that is not a terminal.
    let playbook = |line: &str| -> String {
        let started = Instant::now();
        let mut child = Command::new("sh")
            .args(["-c", line])
            .current_dir(repo.join("ansible"))
            .env("PATH", &path)
            .env("ANSIBLE_INVENTORY", &inventory)
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("{vault_password}\n").as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "`{line}`: {said}");
        eprintln!("{line}: {:.1} s", started.elapsed().as_secs_f64());
        said
    };
    let mut runs = Vec::new();
    for line in &lines[1..] {
        if line.starts_with("ansible-vault create ") {
            // Written rather than edited: the tokens the cloud makes, one per agent.
            let tokens: Vec<String> = (0..2).map(|_| cli("token create --tenant acme")).collect();
            let vault = inventory_dir.join("group_vars/onprem/vault.yml");
            std::fs::create_dir_all(vault.parent().unwrap()).unwrap();
            std::fs::write(
                &vault,
                format!("vault_enroll_tokens:\n  shop1: \"{}\"\n  shop2: \"{}\"\n", tokens[0], tokens[1]),
            )
            .unwrap();
            run(Command::new(format!("{ansible}/ansible-vault"))
                .arg("encrypt")
                .arg("--vault-password-file")
                .arg(&password_file)
                .arg(&vault));
            assert!(std::fs::read_to_string(&vault).unwrap().starts_with("$ANSIBLE_VAULT;"));
            continue;
        }
        assert!(line.starts_with("ansible-playbook "), "{line}");
        let said = playbook(line);
        if line.contains("--limit cloud") {
            for role in ["gateway", "process", "serve"] {
                let unit = format!("actidash-cloud@{role}");
                assert_eq!(host("cloud").unit_property(&unit, "ActiveState"), "active", "{unit}");
            }
            d.wait_ready(Duration::from_secs(120)).unwrap();
            std::fs::write(
                d.root.join("api-token"),
                cli("api-token create --all-tenants --role admin --expires never"),
            )
            .unwrap();
        }
        runs.push(said);
    }
    assert_eq!(runs.len(), 2);
    let counts = changed(&runs[1]);
    assert!(counts.iter().any(|(h, n)| h == "cloud" && *n == 0), "the cloud was already in place: {counts:?}");
    assert!(counts.iter().filter(|(h, n)| h.starts_with("shop") && *n > 0).count() == 2, "{counts:?}");

    // The agents' services run, enrolled; records on each host reach the cloud's three services.
    let mut g = Generator::new(17, 0);
    let mut all: Vec<Line> = Vec::new();
    for shop in ["shop1", "shop2"] {
        let h = host(shop);
        assert_eq!(h.unit_property("actidash-agent", "ActiveState"), "active", "{shop}'s agent");
        assert!(h.root.join("var/lib/actidash/identity/current").exists());
        let lines: Vec<Line> = (0..200).map(|_| g.line_for(Feed::Orders, chrono::Utc::now())).collect();
        std::fs::create_dir_all(h.root.join("srv/shop")).unwrap();
        append_lines(&h.root.join("srv/shop"), &lines).unwrap();
        all.extend(lines);
    }
    let expected = expected_totals(&all);
    wait_until(Duration::from_secs(120), "the cloud to count both agents' orders", || Ok(d.totals()? == expected))
        .unwrap_or_else(|e| {
            panic!("{e:#}; {}", host("shop1").run("journalctl --no-pager -u actidash-agent | tail -20"))
        });

    // Idempotent: the guide's last line again changes nothing anywhere (no second enrollment).
    let second = playbook(lines.last().unwrap());
    let counts = changed(&second);
    assert_eq!(counts.len(), 3, "{second}");
    assert!(counts.iter().all(|(_, n)| *n == 0), "a second run changed something: {counts:?}\n{second}");
    assert_eq!(expected_totals(&all), d.totals().unwrap(), "nothing counted twice");
}
