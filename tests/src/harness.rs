//! Running the real binaries: certificates, configuration files, processes that can be
//! SIGKILLed and restarted, and a small HTTP client for the API. Used by the end-to-end tests
//! and by the demo.

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::generator::Feed;

/// Folder of the workspace's binaries (`target/debug` or `target/release`), found from the
/// running executable (a test in `target/debug/deps/`, or the demo in `target/release/`).
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    let mut dir = exe.parent().context("executable has no folder")?.to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of a workspace binary; an error says how to build it if it is missing.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.exists() {
        bail!("{} is missing: build the workspace's binaries first (cargo build --workspace --bins)", path.display());
    }
    Ok(path)
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

/// A port on 127.0.0.1 free for both UDP and TCP (the gateway listens on both).
pub fn free_udp_port() -> u16 {
    for _ in 0..50 {
        let port = UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map(|a| a.port()).unwrap_or(0);
        if port != 0 && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    0
}

/// The environment the agent's systemd unit gives it (its `Environment=` lines): agents started
/// here (tests, demo, benchmarks) run as the packages run them.
pub fn agent_unit_environment() -> Vec<(String, String)> {
    unit_environment(include_str!("../../installers/systemd/actidash-agent.service"))
}

/// The `NAME=value` assignments of a unit's `Environment=` lines (unquoted, one or more per line,
/// as the units here write them).
pub fn unit_environment(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix("Environment="))
        .flat_map(str::split_whitespace)
        .filter_map(|assignment| assignment.split_once('='))
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect()
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Process {
    pub name: String,
    child: Child,
    args: Vec<String>,
    /// Set on top of the inherited environment.
    env: Vec<(String, String)>,
    program: PathBuf,
    log: PathBuf,
}

impl Process {
    /// Starts `program args…`, appending its stdout and stderr to `log`.
    pub fn start(name: &str, program: &Path, args: &[&str], log: &Path) -> anyhow::Result<Process> {
        Process::start_with_env(name, program, args, Vec::new(), log)
    }

    /// [`Process::start`] with `env` set on top of the inherited environment.
    pub fn start_with_env(
        name: &str,
        program: &Path,
        args: &[&str],
        env: Vec<(String, String)>,
        log: &Path,
    ) -> anyhow::Result<Process> {
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        let child = spawn(program, &args, &env, log)?;
        Ok(Process { name: name.to_owned(), child, args, env, program: program.to_owned(), log: log.to_owned() })
    }

    /// SIGKILL: no chance to flush or close anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit; returns whether it exited cleanly.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        false
    }

    /// Starts the same command again (after a kill).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.child = spawn(&self.program, &self.args, &self.env, &self.log)?;
        Ok(())
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(program: &Path, args: &[String], env: &[(String, String)], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(program)
        .args(args)
        .env("ACTIDASH_LOG", std::env::var("ACTIDASH_LOG").unwrap_or_else(|_| "info".into()))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Configuration of a deployment under test or demo: one folder with certificates, configs,
/// data folders and logs.
#[derive(Debug, Clone)]
pub struct Deployment {
    pub root: PathBuf,
    /// UDP port of the gateway's QUIC endpoint.
    pub gateway_port: u16,
    /// TCP port of the gateway's TLS fallback.
    pub gateway_tcp_port: u16,
    /// The port agents are told to connect to (the gateway's port, unless a test points them
    /// elsewhere, e.g. at the TCP port only, as if UDP were blocked).
    pub agent_port: u16,
    pub api_port: u16,
    /// `host:port` list; None for the embedded mode.
    pub kafka: Option<String>,
    pub topic_prefix: String,
    /// Extra TOML appended to the cloud configuration (such as a `[fleet]` table).
    pub cloud_extra: String,
    /// More lines of the `[kafka]` section.
    pub kafka_extra: String,
    /// More lines of the `[serve]` section.
    pub serve_extra: String,
    /// More lines of the `[gateway]` section.
    pub gateway_extra: String,
}

impl Deployment {
    /// Prepares `root`: the gateway's certificates and the cloud configuration. Agents are
    /// enrolled with tokens when they first start ([`Deployment::enroll`]).
    pub fn new(root: &Path, kafka: Option<String>) -> anyhow::Result<Deployment> {
        std::fs::create_dir_all(root)?;
        let status = Command::new(bin("cloud-aggregator")?)
            .args(["dev-certs", "--out"])
            .arg(root.join("certs"))
            .stdout(Stdio::null())
            .status()
            .context("running cloud-aggregator dev-certs")?;
        anyhow::ensure!(status.success(), "dev-certs failed");
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let gateway_port = free_udp_port();
        let deployment = Deployment {
            root: root.to_owned(),
            gateway_port,
            gateway_tcp_port: gateway_port,
            agent_port: gateway_port,
            api_port: free_tcp_port(),
            kafka,
            topic_prefix: format!("t{}x{}", std::process::id(), nanos % 1_000_000_000),
            cloud_extra: String::new(),
            kafka_extra: String::new(),
            serve_extra: String::new(),
            gateway_extra: String::new(),
        };
        deployment.write_cloud_config()?;
        Ok(deployment)
    }

    pub fn cloud_config_path(&self) -> PathBuf {
        self.root.join("cloud.toml")
    }

    /// (Re)writes the cloud configuration from the fields above.
    pub fn write_cloud_config(&self) -> anyhow::Result<()> {
        let mut text = format!("data_dir = \"{}\"\n", self.root.join("cloud-data").display());
        if let Some(kafka) = &self.kafka {
            text += &format!(
                "\n[kafka]\nbootstrap_servers = \"{kafka}\"\ntopic_prefix = \"{}\"\ngroup_id = \"{}-processors\"\npartitions = 3\n{}",
                self.topic_prefix, self.topic_prefix, self.kafka_extra
            );
        }
        text += &format!(
            "\n[gateway]\nlisten = \"127.0.0.1:{}\"\nlisten_tcp = \"127.0.0.1:{}\"\ncert_file = \"certs/gateway.pem\"\nkey_file = \"certs/gateway.key\"\nheartbeat_interval_ms = 1000\n{}",
            self.gateway_port, self.gateway_tcp_port, self.gateway_extra
        );
        text += &format!("\n[serve]\nlisten = \"127.0.0.1:{}\"\n", self.api_port);
        if let Some(dir) = ui_dir() {
            text += &format!("ui_dir = \"{}\"\n", dir.display());
        }
        text += &self.serve_extra;
        text += &self.cloud_extra;
        std::fs::write(self.cloud_config_path(), text)?;
        Ok(())
    }

    /// Writes an agent's configuration reading `feeds` from `data_dir`; returns its path.
    pub fn write_agent_config(
        &self,
        agent_id: &str,
        tenant: &str,
        data_dir: &Path,
        feeds: &[Feed],
    ) -> anyhow::Result<PathBuf> {
        self.write_agent_config_with(agent_id, tenant, data_dir, feeds, "")
    }

    /// The same, with `extra` TOML tables (such as `[spool]`) added.
    pub fn write_agent_config_with(
        &self,
        agent_id: &str,
        tenant: &str,
        data_dir: &Path,
        feeds: &[Feed],
        extra: &str,
    ) -> anyhow::Result<PathBuf> {
        let mut text = format!(
            "agent_id = \"{agent_id}\"\ntenant = \"{tenant}\"\ndata_dir = \"{}\"\n\n[cloud]\naddress = \"127.0.0.1:{}\"\nserver_name = \"localhost\"\nca_file = \"{}\"\n\n",
            self.root.join(format!("agent-{agent_id}")).display(),
            self.agent_port,
            self.root.join("certs/ca.pem").display(),
        );
        text += extra;
        text.push('\n');
        for feed in feeds {
            text += &feed.source_toml(data_dir);
            text.push('\n');
        }
        let path = self.root.join(format!("agent-{agent_id}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Starts `cloud-aggregator run` with the given roles (all when empty).
    pub fn start_cloud(&self, name: &str, roles: &[&str]) -> anyhow::Result<Process> {
        self.start_cloud_with(name, roles, &[])
    }

    /// [`Deployment::start_cloud`] with more arguments of `run`.
    pub fn start_cloud_with(&self, name: &str, roles: &[&str], more: &[&str]) -> anyhow::Result<Process> {
        let config = self.cloud_config_path();
        let mut args = vec!["run", "--config", config.to_str().context("non-UTF-8 path")?];
        for role in roles {
            args.push("--role");
            args.push(role);
        }
        args.extend_from_slice(more);
        Process::start(name, &bin("cloud-aggregator")?, &args, &self.root.join(format!("{name}.log")))
    }

    /// A single-use enrollment token for `tenant`, from `cloud-aggregator token create`.
    pub fn create_token(&self, tenant: &str, expires: &str) -> anyhow::Result<String> {
        let out = Command::new(bin("cloud-aggregator")?)
            .args(["token", "create", "--tenant", tenant, "--expires", expires, "--config"])
            .arg(self.cloud_config_path())
            .env("ACTIDASH_LOG", "warn")
            .output()
            .context("running cloud-aggregator token create")?;
        anyhow::ensure!(out.status.success(), "token create failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// Runs `edge-agent enroll` with `token` (from a file, as an operator should); the output.
    pub fn run_enroll(&self, config: &Path, token: &str) -> anyhow::Result<std::process::Output> {
        let token_file = config.with_extension("token");
        std::fs::write(&token_file, token)?;
        let out = Command::new(bin("edge-agent")?)
            .args(["enroll", "--config"])
            .arg(config)
            .arg("--token-file")
            .arg(&token_file)
            // Enrollment speaks TLS on TCP: the gateway's fallback port.
            .arg("--url")
            .arg(format!("actidash://127.0.0.1:{}", self.gateway_tcp_port))
            .env("ACTIDASH_LOG", "warn")
            .output()
            .context("running edge-agent enroll")?;
        let _ = std::fs::remove_file(&token_file);
        Ok(out)
    }

    /// Enrolls the agent of `config` (the gateway must be up: retried while it starts).
    pub fn enroll(&self, config: &Path) -> anyhow::Result<()> {
        let cfg = edge_agent::config::AgentConfig::load(config)?;
        if edge_agent::identity::IdentityStore::new(cfg.identity_dir()).is_enrolled() {
            return Ok(());
        }
        let token = self.create_token(&cfg.tenant, "10m")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.run_enroll(config, &token)?;
            if out.status.success() {
                return Ok(());
            }
            let err = String::from_utf8_lossy(&out.stderr).into_owned();
            // Only an unreachable gateway is worth a retry (the token is still unused then).
            if Instant::now() > deadline || err.contains("refused:") {
                bail!("enrolling {}: {err}", cfg.agent_id);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Starts an agent with its configuration file, enrolling it first if it is not yet.
    pub fn start_agent(&self, name: &str, config: &Path) -> anyhow::Result<Process> {
        self.enroll(config)?;
        self.start_agent_unenrolled(name, config)
    }

    /// Starts an agent as it is, enrolled or not.
    pub fn start_agent_unenrolled(&self, name: &str, config: &Path) -> anyhow::Result<Process> {
        let config = config.to_str().context("non-UTF-8 path")?;
        let log = self.root.join(format!("{name}.log"));
        Process::start_with_env(name, &bin("edge-agent")?, &["run", "--config", config], agent_unit_environment(), &log)
    }

    /// `GET path` on the API; the body as JSON.
    /// An API token for every tenant, role admin, made once per deployment (kept in its root).
    pub fn api_token(&self) -> anyhow::Result<String> {
        let path = self.root.join("api-token");
        if let Ok(token) = std::fs::read_to_string(&path) {
            return Ok(token.trim().to_owned());
        }
        let token = self.make_api_token(&["--all-tenants", "--role", "admin", "--expires", "never"])?;
        std::fs::write(&path, &token)?;
        Ok(token)
    }

    /// A new API token: `cloud-aggregator api-token create` with `args` (`--tenant`, `--role`…).
    pub fn make_api_token(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin("cloud-aggregator")?)
            .args(["api-token", "create", "--config"])
            .arg(self.cloud_config_path())
            .args(args)
            .output()
            .context("running cloud-aggregator api-token create")?;
        anyhow::ensure!(out.status.success(), "api-token create: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    pub fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.get_as(&self.api_token()?, path)
    }

    /// [`Deployment::get`] with another token.
    pub fn get_as(&self, token: &str, path: &str) -> anyhow::Result<serde_json::Value> {
        let body = http_get_auth(self.api_port, path, Some(token))?;
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON: {body}"))
    }

    /// The API's totals as (channel, currency) -> (orders, revenue in cents).
    pub fn totals(&self) -> anyhow::Result<crate::generator::ExpectedTotals> {
        let rows = self.get("/api/v1/sales/totals")?;
        let mut totals = crate::generator::ExpectedTotals::new();
        for row in rows.as_array().context("totals are not an array")? {
            let revenue = row["revenue"].as_str().context("revenue is not text")?;
            let (units, frac) = revenue.split_once('.').unwrap_or((revenue, "0"));
            anyhow::ensure!(frac.len() <= 2, "revenue {revenue} has more than 2 decimals");
            let frac = format!("{frac:0<2}");
            let magnitude = units.trim_start_matches('-').parse::<i64>()? * 100 + frac.parse::<i64>()?;
            let cents = if revenue.starts_with('-') { -magnitude } else { magnitude };
            let key =
                (row["channel"].as_str().unwrap_or("").to_owned(), row["currency"].as_str().unwrap_or("").to_owned());
            let orders = row["orders"].as_i64().context("orders is not an integer")?;
            if (orders, cents) != (0, 0) {
                totals.insert(key, (orders, cents));
            }
        }
        Ok(totals)
    }

    /// Events per domain (all minutes since `since` unix seconds), from the API.
    pub fn domain_counts(&self, since: i64) -> anyhow::Result<std::collections::BTreeMap<String, i64>> {
        let answer = self.get(&format!("/api/v1/events?from={since}&group_by=domain"))?;
        let mut counts = std::collections::BTreeMap::new();
        for row in answer["rows"].as_array().context("rows are not an array")? {
            *counts.entry(row["domain"].as_str().unwrap_or("").to_owned()).or_default() +=
                row["events"].as_i64().unwrap_or(0);
        }
        Ok(counts)
    }

    /// Every analytics figure over `[from, to)` (unix seconds), from the API.
    pub fn figures(&self, from: i64, to: i64) -> anyhow::Result<crate::reference::Figures> {
        use crate::reference::{Answers, Figures, MODELS};
        let r = format!("from={from}&to={to}");
        let mut a = Answers {
            sales: self.get(&format!("/api/v1/sales?{r}&group_by=channel,site,country,currency"))?["rows"].take(),
            sales_hourly: self.get(&format!("/api/v1/sales?{r}&granularity=hour&group_by=currency"))?["rows"].take(),
            products: self.get(&format!("/api/v1/sales/products?{r}&limit=10000"))?["rows"].take(),
            behavior: self.get(&format!("/api/v1/behavior?{r}&group_by=referrer"))?,
            behavior_hourly: self.get(&format!("/api/v1/behavior?{r}&granularity=hour"))?,
            funnel: self.get(&format!("/api/v1/behavior/funnel?{r}"))?,
            inventory: self.get("/api/v1/inventory?limit=10000")?,
            ..Answers::default()
        };
        for m in MODELS {
            a.attribution
                .insert(m.into(), self.get(&format!("/api/v1/marketing/attribution?{r}&model={m}&group_by=channel"))?);
        }
        Figures::from_api(&a)
    }

    /// Waits until the API answers.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        wait_until(timeout, "the API to answer /readyz", || Ok(http_get(self.api_port, "/readyz").is_ok()))
    }
}

/// Polls `check` every 200 ms until it returns true or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match check() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last error: {last_error:?})");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A minimal HTTP/1.1 GET on 127.0.0.1:`port`; returns the body of a 2xx answer.
pub fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    http_get_auth(port, path, None)
}

/// [`http_get`] with `Authorization: Bearer <token>`.
pub fn http_get_auth(port: u16, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let (status, body) = http_call(port, "GET", path, token, None)?;
    anyhow::ensure!((200..300).contains(&status), "GET {path}: HTTP {status}: {body}");
    Ok(body)
}

/// An HTTP request with an optional bearer token and JSON body: the status and the body.
pub fn http_call(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    json: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = json.unwrap_or("");
    let kind = if json.is_some() { "Content-Type: application/json\r\n" } else { "" };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{kind}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of HTTP headers")?;
    let status = head.split_whitespace().nth(1).unwrap_or("").parse().context("no HTTP status")?;
    Ok((status, body.to_owned()))
}

/// Appends lines to the feed files in `dir`.
pub fn append_lines(dir: &Path, lines: &[crate::generator::Line]) -> anyhow::Result<()> {
    let mut files = std::collections::BTreeMap::new();
    for line in lines {
        let f = match files.entry(line.feed) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(line.feed.file_name()))?;
                e.insert(std::io::BufWriter::new(f))
            }
        };
        f.write_all(line.text.as_bytes())?;
        f.write_all(b"\n")?;
    }
    for (_, mut f) in files {
        f.flush()?;
    }
    Ok(())
}

/// The built dashboards, where there are some: `ACTIDASH_UI_DIR`, or the workspace's
/// `desktop/ui/dist` (made by `npm run build` there, as the test command and the demo do).
pub fn ui_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("ACTIDASH_UI_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../desktop/ui/dist"),
    };
    let dir = std::fs::canonicalize(dir).ok()?;
    dir.join("index.html").is_file().then_some(dir)
}
