//! The configuration's unit tests: parsing, defaults, every problem with its file, line and
//! key, and the timeline `check` prints.

use super::validate::{human, round_below};
use super::*;

const MINIMAL: &str = r#"
[listen]
http = "127.0.0.1:8080"

[upstreams.web]
servers = ["127.0.0.1:8081"]
"#;

/// The product specification's configuration block, verbatim: every key with its default.
const SPEC_EXAMPLE: &str = r##"[listen]
https = "0.0.0.0:8443"        # TLS listener, ALPN h2 + http/1.1; omit to disable
http  = "0.0.0.0:8080"        # plain HTTP listener; omit to disable (at least one listener)
proxy_protocol = false        # expect a PROXY v1/v2 header first (when behind a TCP load balancer)

[tls]
cert = "certs/dev-cert.pem"   # PEM chain
key  = "certs/dev-key.pem"    # PEM key (PKCS#8, RSA or EC)
session_resumption = true     # TLS 1.3 tickets / 1.2 session cache; false forces full handshakes
# [[tls.sni]]                 # more certificates chosen by SNI
# server_name = "api.example.com"
# cert = "..."
# key = "..."

[downstream]                  # client-facing connections
idle_timeout = "75s"          # close a keep-alive client connection idle this long
header_timeout = "10s"        # time allowed to receive a full request head (slowloris)
max_requests_per_connection = 10000
tcp_keepalive = "60s"         # SO_KEEPALIVE idle time on accepted sockets; "0s" disables
advertise_keep_alive = true   # send `Keep-Alive: timeout=<idle_timeout>` on HTTP/1.1 responses
front_idle_timeout = "0s"     # idle timeout of a load balancer in front of kaproxy, if any:
                              # `check` errors unless idle_timeout > front_idle_timeout
max_header_bytes = 65536
body_timeout = "60s"          # longest gap between two reads of a request body (nginx client_body_timeout)
send_timeout = "60s"          # longest time a write to the client (or an HTTP/2 stream's window)
                              # makes no progress (nginx send_timeout)
max_connections = 0           # open client connections; 0 = derived from the open-file limit.
                              # At the cap the longest-idle keep-alive connections are closed first

[forwarded]
trusted_proxies = []          # CIDRs whose X-Forwarded-For is kept and appended to;
                              # from any other peer an incoming X-Forwarded-For is replaced
x_forwarded_proto = true      # also set X-Forwarded-Proto / X-Forwarded-Port / X-Forwarded-Host
forwarded = false             # also set RFC 7239 Forwarded
x_real_ip = false

[upstreams.web]               # one or more named upstream groups
balance = "round_robin"       # "round_robin" (smooth weighted) or "ip_hash" (consistent)
servers = ["127.0.0.1:8081", { addr = "127.0.0.1:8082", weight = 2 }]
keepalive_timeout = "5s"      # the backend's own keep-alive timeout (Apache KeepAliveTimeout);
                              # a `Keep-Alive: timeout=N` response header overrides it per server
idle_timeout = "4s"           # evict pooled connections idle this long; must be
                              # < keepalive_timeout - safety_margin, else the config is rejected
safety_margin = "500ms"       # the least gap kept between kaproxy's deadline and the backend's
max_lifetime = "60s"          # retire a connection this old after its current request
max_requests_per_connection = 100   # Apache MaxKeepAliveRequests; `Keep-Alive: max=M` overrides
max_idle_per_server = 32
max_connections_per_server = 1024
acquire_timeout = "5s"        # wait for a free slot at max_connections_per_server, then 503
                              # (Reactor Netty's pendingAcquireTimeout)
connect_timeout = "2s"
response_timeout = "60s"      # time to first response byte
tcp_keepalive = "30s"
retry_idempotent = true       # retry GET/HEAD/OPTIONS/PUT/DELETE/TRACE once, on a fresh
                              # connection, when a reused one fails before any response byte
max_retries = 2               # further attempts on other servers after connect failures
retry_backoff = "100ms"       # first back-off between attempts, doubling, capped at 1 s
ip_hash_prefix_v4 = 32        # hash the whole address (24 = nginx ip_hash's /24 behaviour)
ip_hash_prefix_v6 = 64
request_buffer_bytes = 65536  # a request body up to this size is read whole before an upstream
                              # connection is taken (slow uploads never hold Apache); larger ones stream
response_buffer_bytes = 65536 # read a response ahead from the backend up to this much, so a small
                              # response frees its upstream connection however slowly the client reads
retry_on_timeout = false      # an idempotent request that hits response_timeout moves to the next server
request_buffering = true      # read the whole request body (memory, then a temp file) before a backend
                              # is picked; false streams it (nginx proxy_request_buffering off)
max_request_body_bytes = 1073741824  # larger request bodies get 413 (nginx client_max_body_size)
response_buffering = true     # read the response as fast as the backend sends it (memory, then a temp
                              # file); text/event-stream and `X-Accel-Buffering: no` pass through
max_response_spill_bytes = 1073741824   # past this much spilled to disk, back-pressure to the backend

[upstreams.web.health]        # optional active checks; passive checks are always on
path = "/"
interval = "5s"
timeout = "1s"
rise = 2                      # consecutive successes to mark a server up
fall = 3                      # consecutive failures to mark it down

# [[routes]]                  # optional; with one upstream and no routes, all traffic goes to it
# host = "api.example.com"    # exact host or "*.example.com"; omit for any
# path_prefix = "/api"
# upstream = "web"

[buffering]                   # request and response bodies held for slow clients
memory_limit = 134217728      # all in-memory body buffers together; past it bodies go to disk at once
temp_dir = ""                 # where spilled bodies go ("" = the system temp dir); files unlinked at creation

[admin]
listen = "127.0.0.1:9901"     # /metrics (Prometheus text), /healthz, /status (JSON), / (status page)
shutdown_timeout = "30s"      # on SIGTERM/SIGINT, how long in-flight requests may finish

[runtime]
worker_threads = 0            # tokio worker threads; 0 = one per core available to the process

[log]
level = "info"                # or RUST_LOG
format = "text"               # or "json"
access_log = true
"##;

fn parse(src: &str) -> Result<Config, ConfigError> {
    Config::from_toml_str(src, Path::new("config.toml"))
}

fn problems(src: &str) -> Vec<Problem> {
    match parse(src) {
        Err(ConfigError::Invalid(problems)) => problems,
        other => panic!("expected problems, got {other:?}"),
    }
}

/// The timeline line that starts with `label`.
fn row<'a>(text: &'a str, label: &str) -> &'a str {
    let found = text.lines().find(|l| l.trim_start().starts_with(label));
    found.unwrap_or_else(|| panic!("no {label:?} in {text}"))
}

/// MINIMAL with `extra` appended to `[upstreams.web]` (line 7 on).
fn with_upstream(extra: &str) -> String {
    format!("{MINIMAL}{extra}")
}

#[test]
fn defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.listen.http, Some("127.0.0.1:8080".parse().unwrap()));
    assert_eq!(c.listen.https, None);
    assert_eq!(c.tls.cert, PathBuf::from(DEFAULT_TLS_CERT));
    assert!(c.tls.session_resumption);
    assert_eq!(c.downstream.idle_timeout, Duration::from_secs(75));
    assert_eq!(c.downstream.tcp_keepalive, Some(Duration::from_secs(60)));
    assert_eq!(c.downstream.max_header_bytes, 65_536);
    assert!(c.forwarded.x_forwarded_proto && !c.forwarded.forwarded);
    let web = &c.upstreams[0];
    assert_eq!(
        (web.name.as_str(), web.balance),
        ("web", BalanceKind::RoundRobin)
    );
    assert_eq!(web.servers[0].weight, 1);
    assert_eq!(web.pool.keepalive_timeout, Duration::from_secs(5));
    assert_eq!(web.pool.idle_timeout, Duration::from_secs(4));
    assert_eq!(web.pool.safety_margin, Duration::from_millis(500));
    assert_eq!(web.pool.max_requests_per_connection, 100);
    assert_eq!(web.pool.tcp_keepalive, Some(Duration::from_secs(30)));
    assert!(web.pool.learn_keep_alive);
    assert_eq!(web.retry.retry_backoff, Duration::from_millis(100));
    assert_eq!((web.ip_hash_prefix_v4, web.ip_hash_prefix_v6), (32, 64));
    assert!(web.health.is_none());
    assert_eq!(c.admin.listen, Some("127.0.0.1:9901".parse().unwrap()));
    assert_eq!(c.admin.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(
        (c.log.level.as_str(), c.log.format),
        ("info", LogFormat::Text)
    );
    assert!(c.demo.is_none());
    assert_eq!(PoolConfig::default().idle_timeout, web.pool.idle_timeout);
}

#[test]
fn spec_example_parses() {
    let c = parse(SPEC_EXAMPLE).unwrap();
    assert_eq!(c.listen.https, Some("0.0.0.0:8443".parse().unwrap()));
    let web = &c.upstreams[0];
    assert_eq!(web.servers.len(), 2);
    assert_eq!(web.servers[1].weight, 2);
    let health = web.health.as_ref().unwrap();
    assert_eq!(
        (health.path.as_str(), health.rise, health.fall),
        ("/", 2, 3)
    );
    assert_eq!(health.interval, Duration::from_secs(5));
}

#[test]
fn repo_config_parses_and_its_timeline_is_ok() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let c = Config::load(&path).unwrap();
    assert_eq!(c.listen.https, Some("127.0.0.1:8443".parse().unwrap()));
    assert_eq!(c.demo.unwrap().backends.len(), 2);
    let report = check(&path);
    let text = report.to_string();
    assert!(report.is_ok(), "{text}");
    assert!(
        row(&text, "backend keepalive_timeout").contains("OK     4s + 500ms < 5s"),
        "{text}"
    );
    assert!(text.contains("WARN") && !text.contains("ERROR  "), "{text}");
}

#[test]
fn servers_addresses_and_hosts() {
    let src = r#"
[listen]
https = "localhost:8443"
[forwarded]
trusted_proxies = ["10.0.0.0/8", "192.168.1.7", "::1"]
[downstream]
tcp_keepalive = "0s"
[upstreams.b]
balance = "ip_hash"
servers = [{ addr = "127.0.0.1:9002", weight = 3 }]
[upstreams.a]
servers = ["127.0.0.1:9001"]
[[routes]]
host = "API.Example.com"
upstream = "a"
[[routes]]
host = "*.example.com"
path_prefix = "/b"
upstream = "b"
"#;
    let c = parse(src).unwrap();
    assert!(c.listen.https.unwrap().ip().is_loopback());
    assert_eq!(
        c.forwarded.trusted_proxies[1],
        "192.168.1.7/32".parse::<IpNet>().unwrap()
    );
    assert_eq!(
        c.forwarded.trusted_proxies[2],
        "::1/128".parse::<IpNet>().unwrap()
    );
    assert_eq!(c.downstream.tcp_keepalive, None);
    let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(c.upstreams[1].balance, BalanceKind::IpHash);
    assert_eq!(c.upstreams[1].servers[0].weight, 3);
    assert_eq!(
        c.routes[0].host,
        Some(HostMatch::Exact("api.example.com".into()))
    );
    assert_eq!(
        c.routes[1].host,
        Some(HostMatch::Suffix(".example.com".into()))
    );
}

#[test]
fn unknown_key_names_key_and_line() {
    let p = problems(&with_upstream("idle_timout = \"4s\"\n"));
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(7), "upstreams.web.idle_timout")
    );
    let text = p[0].to_string();
    assert!(
        text.starts_with("config.toml:7: upstreams.web.idle_timout: unknown key `idle_timout`"),
        "{text}"
    );
}

#[test]
fn bad_values_name_key_and_line() {
    let p = problems(&with_upstream("keepalive_timeout = \"5 sekunden\"\n"));
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(7), "upstreams.web.keepalive_timeout")
    );
    assert!(p[0].message.contains("expected a duration"), "{}", p[0]);

    let src = "[upstreams.web]\nservers = [\"127.0.0.1:8081\",\n  { addr = \"127.0.0.1\" }]\n";
    let p = problems(src);
    let key = "upstreams.web.servers[1].addr";
    assert_eq!((p[0].line, p[0].key.as_str()), (Some(3), key));
    assert!(p[0].message.contains(r#"expected "host:port""#), "{}", p[0]);

    let p = problems("[forwarded]\ntrusted_proxies = [\n  \"10.0.0.0/8\",\n  \"bogus\",\n]\n");
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(4), "forwarded.trusted_proxies[1]")
    );

    let p = problems("[log]\nformat = \"xml\"\n");
    assert_eq!((p[0].line, p[0].key.as_str()), (Some(2), "log.format"));
}

#[test]
fn syntax_error_and_missing_file() {
    let p = problems("[listen\nhttp = 1\n");
    assert_eq!(p[0].line, Some(1));
    let err = Config::load(Path::new("/nonexistent/kaproxy.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/kaproxy.toml: cannot read"),
        "{err}"
    );
}

#[test]
fn unset_idle_timeout_follows_a_short_keepalive_timeout() {
    let c = Config::from_toml_str(
        &with_upstream("keepalive_timeout = \"1s\"\n"),
        Path::new("config.toml"),
    )
    .expect("a short keepalive_timeout alone is a valid config");
    assert_eq!(c.upstreams[0].pool.idle_timeout, Duration::from_millis(400));
    let c = Config::from_toml_str(
        &with_upstream("keepalive_timeout = \"2s\"\nsafety_margin = \"1s\"\n"),
        Path::new("config.toml"),
    )
    .unwrap();
    assert_eq!(c.upstreams[0].pool.idle_timeout, Duration::from_millis(800));
    // The default stays 4 s wherever it fits.
    let c = Config::from_toml_str(&with_upstream(""), Path::new("config.toml")).unwrap();
    assert_eq!(c.upstreams[0].pool.idle_timeout, Duration::from_secs(4));
}

#[test]
fn upstream_idle_timeout_must_leave_the_safety_margin() {
    let src = with_upstream("keepalive_timeout = \"5s\"\nidle_timeout = \"6s\"\n");
    let p = problems(&src);
    assert_eq!(p.len(), 1);
    assert_eq!(
        p[0].to_string(),
        r#"config.toml:8: upstreams.web.idle_timeout: must be less than keepalive_timeout - safety_margin (5s - 500ms = 4.5s), got 6s; set idle_timeout = "4s""#
    );
    // Equal to the limit is still a race: the ordering is strict.
    assert_eq!(
        problems(&with_upstream("idle_timeout = \"4500ms\"\n")).len(),
        1
    );
    let p = problems(&with_upstream("safety_margin = \"5s\"\n"));
    assert_eq!(p[0].key, "upstreams.web.keepalive_timeout");
}

#[test]
fn front_idle_timeout_must_be_below_downstream_idle_timeout() {
    let src =
        format!("{MINIMAL}[downstream]\nfront_idle_timeout = \"60s\"\nidle_timeout = \"60s\"\n");
    let p = problems(&src);
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(9), "downstream.idle_timeout")
    );
    assert_eq!(p[0].fix.as_deref(), Some(r#"set idle_timeout = "65s""#));
}

#[test]
fn routes_must_name_an_upstream() {
    let p = problems(&format!(
        "{MINIMAL}[[routes]]\npath_prefix = \"/api\"\nupstream = \"api\"\n"
    ));
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(9), "routes[0].upstream")
    );
    assert_eq!(p[0].fix.as_deref(), Some("use one of: web"));
}

#[test]
fn health_path_must_be_a_valid_request_target() {
    let p = problems(&format!(
        "{MINIMAL}[upstreams.web.health]\npath = \"/he alth\"\n"
    ));
    assert_eq!(p[0].key, "upstreams.web.health.path");
    assert!(
        p[0].message.contains("not a valid request target"),
        "{}",
        p[0]
    );
    let p = problems(&format!(
        "{MINIMAL}[upstreams.web.health]\npath = \"health\"\n"
    ));
    assert!(p[0].message.contains("must start with"), "{}", p[0]);
}

#[test]
fn several_upstreams_need_routes() {
    let p = problems(&format!(
        "{MINIMAL}[upstreams.api]\nservers = [\"127.0.0.1:9000\"]\n"
    ));
    assert_eq!(p[0].key, "routes");
    assert!(p[0].message.contains("2 upstream groups"), "{}", p[0]);
}

#[test]
fn all_problems_are_reported_together() {
    let src = r#"
[downstream]
max_header_bytes = 1024

[upstreams.web]
servers = [{ addr = "127.0.0.1:8081", weight = 0 }]
idle_timeout = "5s"
max_idle_per_server = 10
max_connections_per_server = 5
ip_hash_prefix_v4 = 33

[upstreams.web.health]
rise = 0
"#;
    let p = problems(src);
    let got: Vec<(Option<usize>, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
    assert_eq!(
        got,
        [
            (Some(3), "downstream.max_header_bytes"),
            (Some(6), "upstreams.web.servers[0].weight"),
            (Some(7), "upstreams.web.idle_timeout"),
            (Some(8), "upstreams.web.max_idle_per_server"),
            (Some(10), "upstreams.web.ip_hash_prefix_v4"),
            (Some(13), "upstreams.web.health.rise"),
            (None, "listen"),
        ]
    );
    let err = parse(src).unwrap_err().to_string();
    assert_eq!(err.lines().count(), 7, "{err}");
}

#[test]
fn timeline_lists_the_client_deadlines() {
    let src = "[listen]\nhttp = \"127.0.0.1:8080\"\n[downstream]\nbody_timeout = \"5s\"\nmax_connections = 500\n[upstreams.web]\nservers = [\"127.0.0.1:8081\"]\nrequest_buffer_bytes = 1000\n";
    let text = parse(src).unwrap().timeline().to_string();
    assert!(row(&text, "body_timeout").contains("5s"), "{text}");
    assert!(row(&text, "send_timeout").contains("60s"), "{text}");
    assert!(row(&text, "max_connections").contains("500"), "{text}");
    assert!(row(&text, "web request bodies").contains("1000 "), "{text}");
    assert!(
        row(&text, "web request bodies").contains("then on disk"),
        "{text}"
    );
    assert!(
        row(&text, "web request bodies").contains("413 (max_request_body_bytes 1GiB)"),
        "{text}"
    );
    assert!(
        row(&text, "web responses").contains("then up to 1GiB on disk"),
        "{text}"
    );
    assert!(
        row(&text, "buffering memory_limit").contains("128MiB"),
        "{text}"
    );
    let auto = parse(MINIMAL).unwrap().timeline().to_string();
    assert!(row(&auto, "max_connections").contains("auto"), "{auto}");
}

#[test]
fn buffering_keys_parse_with_their_defaults_and_zero_means_no_limit() {
    let c = parse(MINIMAL).unwrap();
    let b = &c.upstreams[0].buffers;
    assert!(b.request_buffering && b.response_buffering);
    assert_eq!(
        b.max_request_body_bytes,
        Some(1 << 30),
        "Apache's LimitRequestBody default"
    );
    assert_eq!(b.max_response_spill_bytes, 1 << 30);
    assert_eq!(c.buffering.memory_limit, 128 << 20);
    assert_eq!(c.buffering.temp_dir, None);
    let dir = tempfile::tempdir().unwrap();
    let src = format!(
        "{}request_buffering = false\nresponse_buffering = false\nmax_request_body_bytes = 0\n\
         max_response_spill_bytes = 0\n[buffering]\nmemory_limit = 1000\ntemp_dir = {:?}\n",
        MINIMAL,
        dir.path().display().to_string()
    );
    let c = parse(&src).unwrap();
    let b = &c.upstreams[0].buffers;
    assert!(!b.request_buffering && !b.response_buffering);
    assert_eq!(
        (b.max_request_body_bytes, b.max_response_spill_bytes),
        (None, 0)
    );
    assert_eq!(c.buffering.memory_limit, 1000);
    assert_eq!(c.buffering.temp_dir.as_deref(), Some(dir.path()));
    let text = c.timeline().to_string();
    assert!(
        row(&text, "web request bodies").contains("then streams"),
        "{text}"
    );
    assert!(
        row(&text, "web request bodies").contains("no size limit"),
        "{text}"
    );
    assert!(
        row(&text, "web responses").contains("response_buffering = false"),
        "{text}"
    );
}

#[test]
fn a_temp_dir_that_is_not_a_directory_is_a_problem_with_its_line() {
    let src = format!("{MINIMAL}[buffering]\ntemp_dir = \"/nonexistent/kaproxy-spill\"\n");
    let p = problems(&src);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "buffering.temp_dir");
    assert_eq!(p[0].line, Some(8));
    assert!(
        p[0].message
            .contains("/nonexistent/kaproxy-spill is not a directory"),
        "{:?}",
        p[0]
    );
}

#[test]
fn timeline_marks_broken_orderings() {
    let c = parse(MINIMAL).unwrap();
    assert!(!c.timeline().has_errors());
    let text = c.timeline().to_string();
    assert!(row(&text, "backend keepalive_timeout").contains("OK     4s + 500ms < 5s"));

    let src = with_upstream("idle_timeout = \"6s\"\nmax_requests_per_connection = 1000\n");
    let src = format!("{src}[downstream]\nfront_idle_timeout = \"90s\"\n[demo]\nbackends = [\"127.0.0.1:8081\"]\n");
    let report = check_str(&src, Path::new("config.toml"));
    assert!(!report.is_ok());
    let timeline = report.timeline.as_ref().unwrap();
    assert!(timeline.has_errors() && timeline.has_warnings());
    let text = report.to_string();
    let errors = text.lines().filter(|l| l.contains("ERROR  ")).count();
    assert_eq!(errors, 2, "{text}");
    assert!(text.contains(r#"fix: set idle_timeout = "4s""#), "{text}");
    assert!(text.contains(r#"fix: set idle_timeout = "95s""#), "{text}");
    assert!(text.contains("delete the [demo] table"), "{text}");
    assert!(text.contains("config.toml: 2 problems"), "{text}");
}

#[test]
fn fixes_suggest_round_values() {
    let ms = Duration::from_millis;
    assert_eq!(round_below(ms(4500)), ms(4000));
    assert_eq!(round_below(ms(5000)), ms(4000));
    assert_eq!(round_below(ms(800)), ms(700));
    assert_eq!(round_below(ms(1000)), ms(900));
    assert_eq!(
        [human(ms(4500)), human(ms(500)), human(ms(75_000))],
        ["4.5s", "500ms", "75s"]
    );
}

// ---- Upstream TLS (README, "TLS to the backends") ----

/// `[upstreams.web]` with `tls = true` (line 7) and `extra` from line 8 on.
fn with_tls(extra: &str) -> String {
    with_upstream(&format!("tls = true\n{extra}"))
}

fn pki() -> kaproxy_testkit::pki::TestPki {
    kaproxy_testkit::pki::TestPki::generate().expect("test PKI")
}

#[test]
fn upstream_tls_is_off_by_default_and_tls_true_alone_takes_the_defaults() {
    assert_eq!(parse(MINIMAL).unwrap().upstreams[0].tls, None);
    let tls = parse(&with_tls("")).unwrap().upstreams[0].tls.clone();
    assert_eq!(tls, Some(UpstreamTlsConfig::new()));
    let tls = tls.unwrap();
    assert_eq!((tls.ca, tls.server_name), (None, None));
    assert!(tls.verify && tls.session_resumption);
    assert_eq!((tls.client_cert, tls.client_key), (None, None));
}

#[test]
fn upstream_tls_keys_parse_into_the_typed_config() {
    let pki = pki();
    let src = with_tls(&format!(
        "tls_ca = \"{}\"\ntls_server_name = \"backend.test\"\ntls_verify = true\n\
         tls_client_cert = \"{}\"\ntls_client_key = \"{}\"\ntls_session_resumption = false\n",
        pki.ca_cert.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    ));
    let tls = parse(&src).unwrap().upstreams[0].tls.clone().unwrap();
    assert_eq!(
        tls,
        UpstreamTlsConfig {
            ca: Some(pki.ca_cert.clone()),
            server_name: Some(ServerName::try_from("backend.test").unwrap()),
            verify: true,
            client_cert: Some(pki.client_cert.clone()),
            client_key: Some(pki.client_key.clone()),
            session_resumption: false,
        }
    );
    // An IP is a name too (verified against an IP SAN).
    let src = with_tls("tls_server_name = \"10.0.0.5\"\n");
    let tls = parse(&src).unwrap().upstreams[0].tls.clone().unwrap();
    assert!(matches!(tls.server_name, Some(ServerName::IpAddress(_))));
}

#[test]
fn a_bad_tls_server_name_names_key_and_line() {
    for bad in ["backend.test:443", "", "not a name"] {
        let p = problems(&with_tls(&format!("tls_server_name = \"{bad}\"\n")));
        assert_eq!(
            (p[0].line, p[0].key.as_str()),
            (Some(8), "upstreams.web.tls_server_name"),
            "{bad:?}"
        );
        assert!(
            p[0].message
                .contains("expected a DNS name or an IP address"),
            "{}",
            p[0]
        );
    }
}

#[test]
fn tls_files_are_read_at_load_time_and_a_bad_one_names_key_and_line() {
    let pki = pki();
    let garbage = pki.dir().join("garbage.pem");
    std::fs::write(&garbage, "not PEM at all\n").unwrap();
    let missing = pki.dir().join("missing.pem");

    let p = problems(&with_tls(&format!("tls_ca = \"{}\"\n", missing.display())));
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(8), "upstreams.web.tls_ca")
    );
    let text = p[0].to_string();
    assert!(
        text.starts_with(&format!(
            "config.toml:8: upstreams.web.tls_ca: {}: cannot read",
            missing.display()
        )),
        "{text}"
    );

    let p = problems(&with_tls(&format!("tls_ca = \"{}\"\n", garbage.display())));
    assert_eq!(p[0].key, "upstreams.web.tls_ca");
    assert!(p[0].message.contains("no PEM certificate"), "{}", p[0]);

    let p = problems(&with_tls(&format!(
        "tls_ca = \"{}\"\n",
        pki.dir().display()
    )));
    assert!(p[0].message.ends_with("not a regular file"), "{}", p[0]);

    // A private key is no CA bundle.
    let p = problems(&with_tls(&format!(
        "tls_ca = \"{}\"\n",
        pki.client_key.display()
    )));
    assert_eq!(p[0].key, "upstreams.web.tls_ca");

    let identity = |cert: &Path, key: &Path| {
        with_tls(&format!(
            "tls_client_cert = \"{}\"\ntls_client_key = \"{}\"\n",
            cert.display(),
            key.display()
        ))
    };
    let p = problems(&identity(&garbage, &pki.client_key));
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(8), "upstreams.web.tls_client_cert")
    );
    let p = problems(&identity(&pki.client_cert, &garbage));
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(9), "upstreams.web.tls_client_key")
    );
    assert!(
        p[0].message.contains("no usable PEM private key"),
        "{}",
        p[0]
    );
    let p = problems(&identity(&pki.client_cert, &pki.server_key));
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(9), "upstreams.web.tls_client_key")
    );
    assert!(p[0].message.contains("does not match"), "{}", p[0]);
    assert!(parse(&identity(&pki.client_cert, &pki.client_key)).is_ok());
}

#[test]
fn mutual_tls_needs_both_the_client_cert_and_its_key() {
    let pki = pki();
    let p = problems(&with_tls(&format!(
        "tls_client_cert = \"{}\"\n",
        pki.client_cert.display()
    )));
    assert_eq!(
        (p.len(), p[0].line, p[0].key.as_str()),
        (1, Some(8), "upstreams.web.tls_client_cert")
    );
    assert!(p[0].message.contains("without tls_client_key"), "{}", p[0]);
    let p = problems(&with_tls(&format!(
        "tls_client_key = \"{}\"\n",
        pki.client_key.display()
    )));
    assert_eq!(p[0].key, "upstreams.web.tls_client_key");
}

#[test]
fn tls_keys_with_tls_false_are_refused() {
    let src = with_upstream("tls_server_name = \"backend.test\"\ntls_verify = false\n");
    let p = problems(&src);
    let got: Vec<(Option<usize>, &str)> = p.iter().map(|p| (p.line, p.key.as_str())).collect();
    assert_eq!(
        got,
        [
            (Some(7), "upstreams.web.tls_server_name"),
            (Some(8), "upstreams.web.tls_verify"),
        ]
    );
    assert_eq!(
        p[0].to_string(),
        "config.toml:7: upstreams.web.tls_server_name: is set but tls = false: nothing would be \
         encrypted; set tls = true, or remove tls_server_name"
    );
    // Written as false, tls is no problem by itself.
    assert!(parse(&with_upstream("tls = false\n")).is_ok());
}

#[test]
fn timeline_shows_upstream_tls_and_warns_when_unverified() {
    let text = parse(MINIMAL).unwrap().timeline().to_string();
    assert!(row(&text, "tls ").contains("off"), "{text}");

    let pki = pki();
    let src = with_tls(&format!(
        "tls_ca = \"{}\"\ntls_server_name = \"backend.test\"\n\
         tls_client_cert = \"{}\"\ntls_client_key = \"{}\"\n",
        pki.ca_cert.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    ));
    let text = parse(&src).unwrap().timeline().to_string();
    let line = row(&text, "tls ");
    for part in [
        "on",
        &format!("CA {}", pki.ca_cert.display()),
        "name backend.test (SNI)",
        "verify on",
        &format!("mTLS {}", pki.client_cert.display()),
        "resumption on",
    ] {
        assert!(line.contains(part), "no {part:?} in {line}");
    }
    assert!(!text.contains("tls_verify"), "{text}");
    let text = parse(&with_tls("")).unwrap().timeline().to_string();
    assert!(
        row(&text, "tls ").contains("CA webpki-roots (built in), name each server's IP (no SNI)"),
        "{text}"
    );

    let src = with_tls("tls_verify = false\ntls_session_resumption = false\n");
    let report = check_str(&src, Path::new("config.toml"));
    assert!(
        report.is_ok(),
        "tls_verify = false is allowed, with a warning"
    );
    let timeline = report.timeline.as_ref().unwrap();
    assert!(timeline.has_warnings() && !timeline.has_errors());
    let text = report.to_string();
    let line = row(&text, "tls ");
    assert!(
        line.contains("no CA check") && line.contains("name each server's IP (no SNI)"),
        "{line}"
    );
    assert!(
        line.contains("verify OFF") && line.contains("resumption off"),
        "{line}"
    );
    let warn = row(&text, "tls_verify");
    assert!(
        warn.contains("WARN") && warn.contains("WARNING: backend certificates are NOT verified"),
        "{text}"
    );
    assert!(text.contains("fix: set tls_verify = true"), "{text}");
}

#[test]
fn upgrade_protocols_default_to_websocket_and_never_take_h2c() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.upstreams[0].upgrade_protocols, vec!["websocket"]);
    assert_eq!(c.upstreams[0].tunnel_idle_timeout, Duration::from_secs(60));
    let c = parse(&with_upstream(
        "upgrade_protocols = [\"WebSocket\", \"foo/2\"]\n",
    ))
    .unwrap();
    assert_eq!(c.upstreams[0].upgrade_protocols, vec!["websocket", "foo/2"]);
    let p = problems(&with_upstream(
        "upgrade_protocols = [\"websocket\", \"h2c\"]\n",
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0].key, "upstreams.web.upgrade_protocols[1]");
    assert!(p[0].message.contains("never tunnelled"), "{:?}", p[0]);
    let p = problems(&with_upstream("upgrade_protocols = [\"a b\"]\n"));
    assert!(p[0].message.contains("not a protocol token"), "{:?}", p[0]);
}

#[test]
fn balance_least_request_is_accepted_and_a_misspelling_names_its_line() {
    let src = "[listen]\nhttp = \"127.0.0.1:8080\"\n[upstreams.web]\nservers = [\"127.0.0.1:8081\"]\nbalance = \"least_request\"\n";
    let c = parse(src).unwrap();
    assert_eq!(c.upstreams[0].balance, BalanceKind::LeastRequest);
    let text = c.timeline().to_string();
    assert!(text.contains("(least_request, 1 server)"), "{text}");

    let p = problems(&src.replace("least_request", "least_conn"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(5), "upstreams.web.balance")
    );
    assert!(p[0].to_string().contains("least_request"), "{}", p[0]);
}

#[test]
fn admin_token_is_optional_and_a_blank_one_names_its_line() {
    let base = "[listen]\nhttp = \"127.0.0.1:8080\"\n[upstreams.web]\nservers = [\"127.0.0.1:8081\"]\n[admin]\n";
    assert_eq!(parse(base).unwrap().admin.token, None);
    let c = parse(&format!("{base}token = \"0123abcd\"\n")).unwrap();
    assert_eq!(c.admin.token.as_deref(), Some("0123abcd"));
    for bad in ["", "two words"] {
        let p = problems(&format!("{base}token = \"{bad}\"\n"));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].line, p[0].key.as_str()),
            (Some(6), "admin.token"),
            "{bad:?}"
        );
    }
}

#[test]
fn slow_start_is_off_by_default_and_read_as_a_duration() {
    let base =
        "[listen]\nhttp = \"127.0.0.1:8080\"\n[upstreams.web]\nservers = [\"127.0.0.1:8081\"]\n";
    assert_eq!(parse(base).unwrap().upstreams[0].slow_start, Duration::ZERO);
    let c = parse(&format!("{base}slow_start = \"30s\"\n")).unwrap();
    assert_eq!(c.upstreams[0].slow_start, Duration::from_secs(30));
    let p = problems(&format!("{base}slow_start = \"soon\"\n"));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(5), "upstreams.web.slow_start")
    );
}

#[test]
fn server_names_are_kept_for_resolve_and_ip_addresses_are_not_names() {
    let src = "[listen]\nhttp = \"127.0.0.1:8080\"\n[upstreams.web]\n\
               servers = [\"localhost:8081\", { addr = \"127.0.0.1:8082\", weight = 2 }, \"[::1]:8083\"]\n\
               resolve = \"30s\"\n";
    let c = parse(src).unwrap();
    let web = &c.upstreams[0];
    assert_eq!(web.resolve, Duration::from_secs(30));
    // localhost: one backend per address getaddrinfo gives it (127.0.0.1, maybe ::1 too).
    let local = web.entries[0].ips.len();
    assert!(local >= 1);
    assert_eq!(web.servers.len(), local + 2);
    for s in &web.servers[..local] {
        assert_eq!(s.name.as_deref(), Some("localhost"));
        assert!(s.addr.ip().is_loopback());
        assert_eq!(s.addr.port(), 8081);
    }
    assert_eq!(
        (
            web.servers[local].name.as_deref(),
            web.servers[local].weight
        ),
        (None, 2)
    );
    assert_eq!(web.servers[local + 1].name, None);
    assert_eq!(c.resolver.servers, Vec::<SocketAddr>::new());
    assert_eq!(
        parse(&src.replace("resolve = \"30s\"\n", ""))
            .unwrap()
            .upstreams[0]
            .resolve,
        Duration::ZERO
    );
}

#[test]
fn a_name_nobody_resolves_and_a_bad_resolver_name_their_lines() {
    // RFC 6761 §6.4: .invalid never resolves.
    let src = "[listen]\nhttp = \"127.0.0.1:8080\"\n[upstreams.web]\n\
               servers = [\"127.0.0.1:8081\", \"nowhere.invalid:80\"]\n";
    let p = problems(src);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(4), "upstreams.web.servers[1]")
    );
    assert!(p[0].message.contains("nowhere.invalid"), "{}", p[0]);

    let p = problems(&format!(
        "{}\n[resolver]\nservers = [\"not-an-address\"]\n",
        src.replace("nowhere.invalid:80", "127.0.0.1:8082")
    ));
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(
        (p[0].line, p[0].key.as_str()),
        (Some(7), "resolver.servers[0]")
    );
}
