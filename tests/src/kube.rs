//! A Kubernetes API server of our own for the tests (`kube-apiserver` on `etcd`, built by
//! `scripts/test.sh` from the Go module proxy): no nodes, so nothing is scheduled, but every
//! object `kubectl` sends is authenticated, validated, defaulted and stored as a cluster would.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{Process, free_tcp_port, wait_until};

pub struct KubeApi {
    /// A kubeconfig for an administrator (group `system:masters`) of this API server.
    pub kubeconfig: PathBuf,
    kubectl: PathBuf,
    // Stopped when dropped: the API server first.
    _apiserver: Process,
    _etcd: Process,
}

impl KubeApi {
    /// Starts etcd and the API server from the binaries in `bin`, their state and logs in `dir`.
    pub fn start(bin: &Path, dir: &Path) -> KubeApi {
        std::fs::create_dir_all(dir).unwrap();
        let (client, peer, secure) = (free_tcp_port(), free_tcp_port(), free_tcp_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let etcd = Process::start(
            "etcd",
            &bin.join("etcd"),
            &[
                "--data-dir",
                dir.join("etcd").to_str().unwrap(),
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer}"),
            ],
            &dir.join("etcd.log"),
        )
        .unwrap();
        // The service accounts' signing key, and one static administrator token.
        let key = dir.join("sa.key");
        crate::hosts::run(Command::new("openssl").args(["genrsa", "-out"]).arg(&key).arg("2048"));
        let token = format!("t{}", std::process::id());
        std::fs::write(dir.join("tokens.csv"), format!("{token},admin,admin,\"system:masters\"\n")).unwrap();
        let apiserver = Process::start(
            "kube-apiserver",
            &bin.join("kube-apiserver"),
            &[
                &format!("--etcd-servers={etcd_url}"),
                &format!("--cert-dir={}", dir.join("certs").display()),
                &format!("--secure-port={secure}"),
                "--bind-address=127.0.0.1",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc",
                &format!("--service-account-key-file={}", key.display()),
                &format!("--service-account-signing-key-file={}", key.display()),
                &format!("--token-auth-file={}", dir.join("tokens.csv").display()),
                "--authorization-mode=RBAC",
            ],
            &dir.join("kube-apiserver.log"),
        )
        .unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{secure}\n    \
                 insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n\
                 - name: test\n  context:\n    cluster: test\n    user: admin\ncurrent-context: test\n"
            ),
        )
        .unwrap();
        let api = KubeApi { kubeconfig, kubectl: bin.join("kubectl"), _apiserver: apiserver, _etcd: etcd };
        wait_until(Duration::from_secs(120), "the Kubernetes API server to be ready", || {
            Ok(api.kubectl(&["get", "--raw", "/readyz"]).output()?.status.success())
        })
        .unwrap_or_else(|e| {
            panic!("{e}: {}", std::fs::read_to_string(dir.join("kube-apiserver.log")).unwrap_or_default())
        });
        api
    }

    /// `kubectl args…` against this API server.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.kubectl);
        cmd.args(args).env("KUBECONFIG", &self.kubeconfig);
        cmd
    }
}
