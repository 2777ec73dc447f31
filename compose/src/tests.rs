//! Whole files through `load`: a full example, every kind of error (each
//! naming file, line and key), interpolation, merging, warnings.

use std::collections::HashMap;
use std::path::PathBuf;

use super::*;

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load(&self, files: &[&str], env: &[(&str, &str)]) -> Result<Stack, ComposeError> {
        let files: Vec<PathBuf> = files.iter().map(|f| self.0.path().join(f)).collect();
        let env: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        load(&files, &env, "shop")
    }
}

fn service<'a>(s: &'a Stack, key: &str) -> &'a ServiceSpec {
    &s.services.iter().find(|(k, _)| k == key).unwrap().1
}

/// Loads `text` as compose.yml and returns the error, with the file name
/// as the test wrote it (the temp dir stripped).
fn error(text: &str) -> String {
    let d = Dir::new();
    d.write("compose.yml", text);
    d.write("db_password.txt", "pw\n");
    let e = d.load(&["compose.yml"], &[]).expect_err("expected an error").to_string();
    e.replace(&format!("{}/", d.0.path().display()), "")
}

const FULL: &str = r#"version: "3.8"
x-common: &common
  labels:
    tier: app
services:
  web:
    <<: *common
    image: busybox:latest
    command: sh -c 'echo "hello $${USER} from ${NAME}" > /www/index.html && exec httpd -f -p 80 -h /www'
    entrypoint: ["/bin/sh"]
    environment:
      - A=1
      - FROM_ENV
      - NOT_ANYWHERE
    env_file: ./web.env
    ports:
      - "8080:80"
      - target: 443
        published: 8443
        mode: host
      - "9000-9001:90-91/udp"
      - 7000
    networks:
      front:
        aliases: [www]
      ext:
    volumes:
      - data:/data:ro
      - ./site:/site
      - /srv/abs:/abs
      - type: tmpfs
        target: /tmp
        tmpfs: {size: 64M, mode: 1777}
      - type: volume
        source: data
        target: /data2
        volume: {nocopy: true}
    secrets:
      - db_password
      - source: api_key
        target: /etc/api.key
    configs:
      - app_conf
    healthcheck:
      test: ["CMD", "wget", "-q", "-O", "-", "http://localhost/a b"]
      interval: 10s
      timeout: 2s
      retries: 5
      start_period: 1m30s
    user: "1000:1000"
    working_dir: /www
    read_only: true
    stop_grace_period: 20s
    deploy:
      replicas: ${REPLICAS:-3}
      labels: {team: shop}
      resources:
        limits: {cpus: "0.5", memory: 64M}
        reservations: {cpus: 0.25, memory: 32M}
      placement:
        constraints: [node.labels.zone==a]
        preferences: [{spread: node.labels.rack}]
      update_config: {parallelism: 2, delay: 5s, failure_action: rollback, order: start-first}
      rollback_config: {failure_action: continue}
      restart_policy: {condition: on-failure, delay: 2s, max_attempts: 3, window: 1m}
      endpoint_mode: vip
  db:
    image: busybox
    command: [nc, -lk, -p, "5432"]
    deploy:
      mode: global
    healthcheck:
      test: nc -z localhost 5432 || exit 1
networks:
  front:
    driver: overlay
    internal: true
    ipam: {config: [{subnet: 100.64.7.0/24}]}
    labels: [a=b]
  ext:
    external: true
    name: shared
  unused: {}
volumes:
  data:
    driver_opts: {type: tmpfs, device: tmpfs, o: size=64m}
  unused_vol:
secrets:
  db_password: {file: ./db_password.txt}
  api_key: {external: true}
  unused_ext: {external: true, name: other}
  unused_own: {file: ./db_password.txt}
configs:
  app_conf: {file: ./conf/app.conf, labels: {x: y}}
"#;

#[test]
fn full_example() {
    let d = Dir::new();
    d.write("compose.yml", FULL);
    d.write("web.env", "# web\nA=from-file\nB=2\n");
    d.write("db_password.txt", "s3cret\n");
    d.write("conf/app.conf", "k=v\n");
    let s = d.load(&["compose.yml"], &[("NAME", "shoal"), ("FROM_ENV", "yes")]).unwrap();
    let root = d.0.path().display().to_string();
    assert_eq!(s.name, "shop");
    assert_eq!(s.services.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["web", "db"]);

    let web = service(&s, "web");
    assert_eq!(web.name, "shop_web");
    assert_eq!(web.image, "busybox:latest");
    assert_eq!(web.entrypoint, ["/bin/sh"]);
    assert_eq!(web.args, ["sh", "-c", r#"echo "hello ${USER} from shoal" > /www/index.html && exec httpd -f -p 80 -h /www"#]);
    assert_eq!(web.env, ["A=1", "B=2", "FROM_ENV=yes"]);
    let ports: Vec<(u32, u32, &str, &str)> = web.ports.iter().map(|p| (p.published, p.target, p.protocol.as_str(), p.mode.as_str())).collect();
    assert_eq!(
        ports,
        [
            (8080, 80, "tcp", "ingress"),
            (8443, 443, "tcp", "host"),
            (9000, 90, "udp", "ingress"),
            (9001, 91, "udp", "ingress"),
            (7000, 7000, "tcp", "ingress"),
        ]
    );
    assert_eq!(web.networks, ["shop_front", "shared"]);
    assert_eq!(web.aliases, ["web", "www"]);
    let mounts: Vec<(&str, &str, &str, bool)> = web.mounts.iter().map(|m| (m.r#type.as_str(), m.source.as_str(), m.target.as_str(), m.read_only)).collect();
    let site = format!("{root}/site");
    assert_eq!(
        mounts,
        [
            ("volume", "shop_data", "/data", true),
            ("bind", site.as_str(), "/site", false),
            ("bind", "/srv/abs", "/abs", false),
            ("tmpfs", "", "/tmp", false),
            ("volume", "shop_data", "/data2", false),
        ]
    );
    assert_eq!((web.mounts[3].tmpfs_size, web.mounts[3].tmpfs_mode), (64 << 20, 0o1777));
    assert!(web.mounts[4].volume_nocopy);
    assert_eq!(web.secrets, ["shop_db_password", "api_key"]);
    assert_eq!(web.secret_targets["shop_db_password"], "db_password");
    assert_eq!(web.secret_targets["api_key"], "/etc/api.key");
    assert_eq!(web.configs, ["shop_app_conf"]);
    assert_eq!(web.config_targets["shop_app_conf"], "/app_conf");
    assert_eq!(web.health_cmd, "wget -q -O - 'http://localhost/a b'");
    assert_eq!((web.health_interval_ms, web.health_timeout_ms, web.health_retries, web.health_start_period_ms), (10_000, 2_000, 5, 90_000));
    assert_eq!((web.user.as_str(), web.workdir.as_str(), web.read_only, web.stop_grace_period_ms), ("1000:1000", "/www", true, 20_000));
    assert_eq!((web.mode.as_str(), web.replicas), ("replicated", 3));
    assert_eq!(web.labels["tier"], "app");
    assert_eq!(web.labels["team"], "shop");
    assert_eq!(web.labels[NAMESPACE_LABEL], "shop");
    let limits = web.limits.unwrap();
    assert_eq!((limits.nano_cpus, limits.memory_bytes), (500_000_000, 64 << 20));
    let res = web.reservations.unwrap();
    assert_eq!((res.nano_cpus, res.memory_bytes), (250_000_000, 32 << 20));
    assert_eq!(web.constraints, ["node.labels.zone==a"]);
    assert_eq!(web.placement_prefs, ["spread=node.labels.rack"]);
    let u = web.update.clone().unwrap();
    assert_eq!((u.parallelism, u.delay_ms, u.failure_action.as_str(), u.order.as_str()), (2, 5_000, "rollback", "start-first"));
    let rb = web.rollback.clone().unwrap();
    assert_eq!((rb.parallelism, rb.failure_action.as_str()), (1, "continue"));
    let r = web.restart.clone().unwrap();
    assert_eq!((r.condition.as_str(), r.delay_ms, r.max_attempts, r.window_ms), ("on-failure", Some(2_000), 3, 60_000));
    assert_eq!(web.endpoint_mode, "vip");

    let db = service(&s, "db");
    assert_eq!((db.mode.as_str(), db.replicas), ("global", 0));
    assert_eq!(db.args, ["nc", "-lk", "-p", "5432"]);
    assert_eq!(db.networks, ["shop_default"]);
    assert_eq!(db.aliases, ["db"]);
    assert_eq!(db.health_cmd, "nc -z localhost 5432 || exit 1");
    // Swarm's defaults where the file says nothing.
    let r = db.restart.clone().unwrap();
    assert_eq!((r.condition.as_str(), r.delay_ms), ("any", Some(5000)));
    let u = db.update.clone().unwrap();
    assert_eq!((u.parallelism, u.failure_action.as_str()), (1, "pause"));
    assert!(db.rollback.is_none());

    // Only what services use, plus every secret/config the stack owns.
    let nets: Vec<(&str, bool)> = s.networks.iter().map(|n| (n.name.as_str(), n.external)).collect();
    assert_eq!(nets, [("shop_front", false), ("shared", true), ("shop_default", false)]);
    let front = &s.networks[0].req;
    assert_eq!((front.name.as_str(), front.subnet.as_str(), front.internal), ("shop_front", "100.64.7.0/24", true));
    assert_eq!(front.labels["a"], "b");
    assert_eq!(front.labels[NAMESPACE_LABEL], "shop");
    assert_eq!(s.networks[2].req.labels[NAMESPACE_LABEL], "shop");
    assert_eq!(s.volumes.len(), 1);
    let vol = &s.volumes[0].req;
    assert_eq!(vol.name, "shop_data");
    assert_eq!(vol.options["o"], "size=64m");
    assert_eq!(vol.labels[NAMESPACE_LABEL], "shop");
    let secrets: Vec<(&str, bool)> = s.secrets.iter().map(|x| (x.name.as_str(), x.external)).collect();
    assert_eq!(secrets, [("shop_db_password", false), ("api_key", true), ("shop_unused_own", false)]);
    assert_eq!(s.secrets[0].req.data, b"s3cret\n");
    assert_eq!(s.secrets[0].req.kind, "secret");
    assert_eq!(s.secrets[0].digest(), "sha256:82ba9d712d21dc7585dd6a1f29790679985547f009baee10ea2e3edd41ce957d");
    assert_eq!(s.configs[0].req.data, b"k=v\n");
    assert_eq!(s.configs[0].req.kind, "config");
    assert_eq!(s.configs[0].req.labels["x"], "y");
    // `- NOT_ANYWHERE` takes its value from the environment; unset, it is left out.
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
}

#[test]
fn unknown_keys_and_wrong_types() {
    let base = "services:\n  web:\n    image: busybox\n    deploy:\n";
    assert_eq!(error(&format!("{base}      replicaz: 2\n")), "compose.yml:5: services.web.deploy.replicaz: unknown key");
    assert_eq!(
        error(&format!("{base}      replicas: many\n")),
        "compose.yml:5: services.web.deploy.replicas: expected a whole number, found \"many\""
    );
    assert_eq!(error("services:\n  web:\n    image: busybox\n    imagez: x\n"), "compose.yml:4: services.web.imagez: unknown key");
    assert_eq!(error("servicez: {}\n"), "compose.yml:1: servicez: unknown key");
    assert_eq!(
        error("services:\n  web:\n    image: busybox\n    read_only: maybe\n"),
        "compose.yml:4: services.web.read_only: expected true or false, found \"maybe\""
    );
    assert_eq!(
        error("services:\n  web:\n    image: busybox\n    ports: \"80:80\"\n"),
        "compose.yml:4: services.web.ports: expected a list, found \"80:80\""
    );
    assert_eq!(
        error("services:\n  web:\n    image: busybox\n    stop_grace_period: 10\n"),
        "compose.yml:4: services.web.stop_grace_period: expected a duration such as 1m30s or 500ms, found \"10\""
    );
    assert_eq!(
        error("services:\n  web:\n    image: busybox\n    deploy:\n      resources:\n        limits:\n          memory: lots\n"),
        "compose.yml:7: services.web.deploy.resources.limits.memory: expected a size such as 64M, 1g or a byte count, found \"lots\""
    );
    assert_eq!(
        error("services:\n  web:\n    image: busybox\n    deploy:\n      mode: global\n      replicas: 2\n"),
        "compose.yml:6: services.web.deploy.replicas: replicas can only be used with replicated mode"
    );
    assert_eq!(error("services:\n  web:\n    command: x\n"), "compose.yml:2: services.web: `image:` is required: a stack runs images already in the cluster (`shoal image import|load`)");
    assert_eq!(error("services: {}\n"), "compose.yml: no services defined");
    assert!(error("services:\n  web:\n    image: busybox\n  - x\n").starts_with("compose.yml:4: invalid YAML"));
}

#[test]
fn malformed_ports() {
    let port = |p: &str| error(&format!("services:\n  web:\n    image: busybox\n    ports:\n      - \"{p}\"\n"));
    assert!(port("80:http").starts_with("compose.yml:5: services.web.ports[0]: \"80:http\": expected TARGET, PUBLISHED:TARGET"), "{}", port("80:http"));
    assert!(port("70000:80").contains("(ports 1-65535)"));
    assert_eq!(port("8080-8082:80-81"), "compose.yml:5: services.web.ports[0]: \"8080-8082:80-81\": the published and target ranges must be the same length");
    assert_eq!(port("80:80/icmp"), "compose.yml:5: services.web.ports[0]: protocol \"icmp\": expected tcp or udp");
    assert_eq!(
        port("127.0.0.1:80:80"),
        "compose.yml:5: services.web.ports[0]: not supported by shoal: \"127.0.0.1:80:80\": a host IP: published ports listen on every node's addresses (the routing mesh)"
    );
    let long = error("services:\n  web:\n    image: busybox\n    ports:\n      - target: 80\n        published: 0\n");
    assert_eq!(long, "compose.yml:6: services.web.ports[0].published: must be 1-65535");
    let long = error("services:\n  web:\n    image: busybox\n    ports:\n      - target: 80\n        host_ip: 0.0.0.0\n");
    assert!(long.starts_with("compose.yml:6: services.web.ports[0].host_ip: not supported by shoal"), "{long}");
}

#[test]
fn undefined_references() {
    let svc = "services:\n  web:\n    image: busybox\n";
    assert_eq!(
        error(&format!("{svc}    networks: [front, back]\nnetworks:\n  front:\n")),
        "compose.yml:4: services.web.networks[1]: undefined network \"back\": declare it under the top-level `networks:`"
    );
    assert_eq!(
        error(&format!("{svc}    networks:\n      back:\n")),
        "compose.yml:5: services.web.networks.back: undefined network \"back\": declare it under the top-level `networks:`"
    );
    assert_eq!(
        error(&format!("{svc}    volumes:\n      - dbdata:/data\n")),
        "compose.yml:5: services.web.volumes[0]: undefined volume \"dbdata\": declare it under the top-level `volumes:`"
    );
    assert_eq!(
        error(&format!("{svc}    secrets:\n      - source: db_password\n")),
        "compose.yml:5: services.web.secrets[0].source: undefined secret \"db_password\": declare it under the top-level `secrets:`"
    );
    assert_eq!(
        error(&format!("{svc}    configs: [app]\n")),
        "compose.yml:4: services.web.configs[0]: undefined config \"app\": declare it under the top-level `configs:`"
    );
    assert_eq!(
        error(&format!("{svc}    volumes:\n      - /data\n")),
        "compose.yml:5: services.web.volumes[0]: not supported by shoal: \"/data\": anonymous volumes; name one (NAME:/dst) and declare it under the top-level `volumes:`"
    );
}

#[test]
fn relative_paths_stay_beside_the_file() {
    let svc = "services:\n  web:\n    image: busybox\n";
    let e = error(&format!("{svc}    volumes:\n      - ../etc:/etc2\n"));
    assert!(e.starts_with("compose.yml:5: services.web.volumes[0]: \"../etc\" leads outside the directory of compose.yml"), "{e}");
    let e = error(&format!("{svc}    env_file: ./a/../../x.env\n"));
    assert!(e.starts_with("compose.yml:4: services.web.env_file: \"./a/../../x.env\" leads outside"), "{e}");
    let e = error(&format!("{svc}secrets:\n  s:\n    file: ../../etc/shadow\n"));
    assert!(e.starts_with("compose.yml:6: secrets.s.file: \"../../etc/shadow\" leads outside"), "{e}");
    let e = error(&format!("{svc}    env_file: missing.env\n"));
    assert!(e.starts_with("compose.yml:4: services.web.env_file: cannot read missing.env"), "{e}");
    // Inside is fine, and `required: false` may be missing.
    let d = Dir::new();
    d.write("app/sub/x.env", "X=1\n");
    d.write("app/compose.yml", &format!("{svc}    env_file:\n      - ./sub/../sub/x.env\n      - path: ./nope.env\n        required: false\n"));
    let s = d.load(&["app/compose.yml"], &[]).unwrap();
    assert_eq!(service(&s, "web").env, ["X=1"]);
}

#[test]
fn swarm_fields_shoal_cannot_honour() {
    let svc = "services:\n  web:\n    image: busybox\n";
    let cases: &[(&str, &str)] = &[
        ("    deploy:\n      update_config:\n        monitor: soon\n", "compose.yml:6: services.web.deploy.update_config.monitor"),
        ("    deploy:\n      rollback_config:\n        max_failure_ratio: 1.5\n", "compose.yml:6: services.web.deploy.rollback_config.max_failure_ratio"),
        ("    deploy:\n      resources:\n        limits:\n          pids: 0\n", "compose.yml:7: services.web.deploy.resources.limits.pids"),
        ("    deploy:\n      placement:\n        max_replicas_per_node: 1\n", "compose.yml:6: services.web.deploy.placement.max_replicas_per_node: not supported by shoal"),
        ("    deploy:\n      mode: replicated-job\n", "compose.yml:5: services.web.deploy.mode: not supported by shoal"),
        ("    secrets:\n      - source: s\n        uid: \"103\"\n", "compose.yml:6: services.web.secrets[0].uid: not supported by shoal"),
        ("    secrets:\n      - source: s\n        mode: 0400\n", "compose.yml:6: services.web.secrets[0].mode: not supported by shoal"),
        ("    networks:\n      front:\n        ipv4_address: 100.64.7.9\n", "compose.yml:6: services.web.networks.front.ipv4_address: not supported by shoal"),
        ("    volumes:\n      - type: bind\n        source: /srv\n        target: /srv\n        bind:\n          propagation: rshared\n", "compose.yml:9: services.web.volumes[0].bind.propagation: not supported by shoal"),
        ("    volumes:\n      - /srv:/srv:rshared\n", "compose.yml:5: services.web.volumes[0]: not supported by shoal"),
        ("    hostname: web1\n", "compose.yml:4: services.web.hostname: not supported by shoal: a task's hostname is set by shoal"),
        ("    mem_limit: 64m\n", "compose.yml:4: services.web.mem_limit: not supported by shoal: set resource limits with deploy.resources"),
        ("    healthcheck:\n      interval: 5s\n", "compose.yml:5: services.web.healthcheck: a health check needs `test:`"),
        ("    healthcheck:\n      test: [\"BOGUS\"]\n", "compose.yml:5: services.web.healthcheck.test: expected [CMD, program, args...]"),
        ("    healthcheck:\n      test: true\n      disable: true\n", "compose.yml:6: services.web.healthcheck.disable: test and disable can't be set at the same time"),
    ];
    let tops = "networks:\n  front:\nsecrets:\n  s:\n    file: ./db_password.txt\n";
    for (part, want) in cases {
        let e = error(&format!("{svc}{part}{tops}"));
        assert!(e.starts_with(want), "{part}\n got: {e}\nwant: {want}");
    }
    let top_cases: &[(&str, &str)] = &[
        ("volumes:\n  v:\n    driver: nfs\n", "compose.yml:6: volumes.v.driver: not supported by shoal: volume driver \"nfs\": shoal has the local driver only"),
        ("volumes:\n  v:\n    driver_opts:\n      mountpoint: /x\n", "compose.yml:7: volumes.v.driver_opts.mountpoint: not supported by shoal"),
        ("networks:\n  n:\n    driver: bridge\n", "compose.yml:6: networks.n.driver: not supported by shoal: network driver \"bridge\": shoal networks are overlays"),
        ("networks:\n  n:\n    ipam:\n      config:\n        - subnet: 100.64.7.1/24\n", "compose.yml:8: networks.n.ipam.config[0].subnet: \"100.64.7.1/24\": expected an IPv4 network"),
        ("networks:\n  n:\n    external: true\n    driver: overlay\n", "compose.yml:7: networks.n.driver: an external network exists already: it takes only `name`, not `driver`"),
        ("secrets:\n  s: {}\n", "compose.yml:5: secrets.s: a secret needs `file:` (or `external: true` for one that exists)"),
        ("configs:\n  c:\n    content: hi\n", "compose.yml:6: configs.c.content: not supported by shoal"),
        ("networks:\n  Front: {}\n", "compose.yml:5: networks.Front: network name \"shop_Front\" is invalid"),
    ];
    for (part, want) in top_cases {
        let e = error(&format!("{svc}{part}"));
        assert!(e.starts_with(want), "{part}\n got: {e}\nwant: {want}");
    }
}

#[test]
fn names() {
    assert!(matches!(validate_stack_name("shop-2"), Ok(())));
    for bad in ["", "Shop", "shop_x", "-shop", "shop-", &"s".repeat(64)] {
        assert!(validate_stack_name(bad).is_err(), "{bad}");
    }
    let e = error("services:\n  Web:\n    image: busybox\n");
    assert!(e.starts_with("compose.yml:2: services.Web: service name \"shop_Web\" is invalid"), "{e}");
    let e = error("services:\n  web:\n    image: busybox\n    networks:\n      default:\n        aliases: [Www]\n");
    assert!(e.starts_with("compose.yml:6: services.web.networks.default.aliases[0]: alias \"Www\" is invalid"), "{e}");
}

#[test]
fn external_and_named_objects() {
    let d = Dir::new();
    d.write(
        "compose.yml",
        "services:\n  web:\n    image: busybox\n    networks: [pub, own]\n    volumes: [\"v:/v\"]\n\
         networks:\n  pub:\n    external:\n      name: public\n  own:\n    name: custom-net\n\
         volumes:\n  v:\n    external: true\n",
    );
    let s = d.load(&["compose.yml"], &[]).unwrap();
    let nets: Vec<(&str, &str, bool)> = s.networks.iter().map(|n| (n.key.as_str(), n.name.as_str(), n.external)).collect();
    assert_eq!(nets, [("pub", "public", true), ("own", "custom-net", false)]);
    assert_eq!(service(&s, "web").networks, ["public", "custom-net"]);
    assert_eq!(service(&s, "web").mounts[0].source, "v");
    assert!(s.volumes[0].external);
    // An external object carries no stack label: the stack doesn't own it.
    assert!(!s.networks[0].req.labels.contains_key(NAMESPACE_LABEL));
    assert!(s.networks[1].req.labels.contains_key(NAMESPACE_LABEL));
}

#[test]
fn interpolation() {
    let d = Dir::new();
    d.write(".env", "TAG=1.0\nPORT=8080\nOVERRIDDEN=from-dotenv\n");
    d.write(
        "compose.yml",
        "services:\n  web:\n    image: \"busybox:${TAG}\"\n    ports: [\"${PORT}:80\"]\n    environment:\n      O: $OVERRIDDEN\n      D: ${MISSING:-fallback}\n      E: \"${EMPTY-unset}\"\n      P: \"cost $$5\"\n      U: ${NOPE}\n    deploy:\n      replicas: ${N}\n",
    );
    let s = d.load(&["compose.yml"], &[("OVERRIDDEN", "from-env"), ("EMPTY", ""), ("N", "4")]).unwrap();
    let web = service(&s, "web");
    assert_eq!(web.image, "busybox:1.0");
    assert_eq!(web.ports[0].published, 8080);
    assert_eq!(web.env, ["D=fallback", "E=", "O=from-env", "P=cost $5", "U="]);
    assert_eq!(web.replicas, 4);
    assert_eq!(s.warnings, ["The \"NOPE\" variable is not set. Defaulting to a blank string."]);

    let e = error("services:\n  db:\n    image: busybox\n    environment:\n      PW: ${DB_PW:?set DB_PW in .env}\n");
    assert_eq!(e, "compose.yml:5: services.db.environment.PW: required variable DB_PW is missing a value: set DB_PW in .env");
    let e = error("services:\n  db:\n    image: busybox\n    command: [\"sh\", \"-c\", \"echo ${X?}\"]\n");
    assert_eq!(e, "compose.yml:4: services.db.command[2]: required variable X is missing a value");
    let e = error("services:\n  db:\n    image: busybox\n    command: awk '{print $1}'\n");
    assert!(e.starts_with("compose.yml:4: services.db.command: invalid interpolation: a '$' in"), "{e}");
    assert!(e.contains("write $$ for a literal '$'"), "{e}");
}

#[test]
fn later_files_override_earlier_ones() {
    let d = Dir::new();
    d.write(
        "base.yml",
        "services:\n  web:\n    image: busybox:1\n    ports: [\"80:80\", \"443:443\"]\n    environment:\n      A: base\n      B: base\n    deploy:\n      replicas: 1\n      labels: {x: base}\n  db:\n    image: busybox:1\n",
    );
    d.write(
        "prod/override.yml",
        "services:\n  web:\n    image: busybox:2\n    ports: [\"8080:80\"]\n    environment:\n      B: prod\n    volumes: [\"./data:/data\"]\n    deploy:\n      replicas: 5\n  cache:\n    image: busybox:1\n",
    );
    let s = d.load(&["base.yml", "prod/override.yml"], &[]).unwrap();
    assert_eq!(s.services.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["web", "db", "cache"]);
    let web = service(&s, "web");
    assert_eq!(web.image, "busybox:2");
    assert_eq!(web.ports.len(), 1, "lists are replaced, not appended");
    assert_eq!(web.env, ["A=base", "B=prod"]);
    assert_eq!(web.replicas, 5);
    assert_eq!(web.labels["x"], "base");
    // Relative to the file that says it.
    assert_eq!(web.mounts[0].source, format!("{}/prod/data", d.0.path().display()));
    // Errors point at the file the value came from.
    d.write("bad.yml", "services:\n  web:\n    deploy:\n      replicas: lots\n");
    let e = d.load(&["base.yml", "bad.yml"], &[]).unwrap_err().to_string();
    assert!(e.ends_with("bad.yml:4: services.web.deploy.replicas: expected a whole number, found \"lots\""), "{e}");
}

#[test]
fn ignored_options_warn_once_each() {
    let d = Dir::new();
    d.write(
        "compose.yml",
        "version: '3'\nname: ignored\nservices:\n  a:\n    image: busybox\n    build: .\n    restart: always\n    depends_on: [b]\n    container_name: a1\n    sysctls: {net.core.somaxconn: 1024}\n  b:\n    image: busybox\n    build: ./b\n    restart: on-failure\n    networks: [n]\n    x-note: extension keys are fine\nnetworks:\n  n:\n    attachable: true\nx-anything: {}\n",
    );
    d.write("b/.keep", "");
    let s = d.load(&["compose.yml"], &[]).unwrap();
    assert_eq!(
        s.warnings,
        [
            "Ignoring unsupported options: attachable",
            "Ignoring unsupported options: build",
            "Ignoring unsupported options: depends_on",
            "Ignoring unsupported options: name",
            "Ignoring unsupported options: restart",
            "Ignoring unsupported options: sysctls",
            "Ignoring deprecated options: container_name: Setting the container name is not supported.",
        ]
    );
}

#[test]
fn short_and_long_forms() {
    let d = Dir::new();
    d.write("db_password.txt", "pw");
    d.write(
        "compose.yml",
        "services:\n  web:\n    image: busybox\n    command: [\"httpd\", \"-f\", 8080]\n    environment: [K=V, EMPTY=]\n    labels: [a=1, b]\n    healthcheck:\n      test: [\"CMD-SHELL\", \"wget -q -O- localhost:8080 || exit 1\"]\n    secrets:\n      - source: pw\n        target: password\n    volumes:\n      - type: bind\n        source: ./html\n        target: /www\n        read_only: true\n      - v:/v:nocopy,ro\n    deploy:\n      labels: [c=3]\n  off:\n    image: busybox\n    healthcheck:\n      disable: true\n  none:\n    image: busybox\n    healthcheck:\n      test: [NONE]\nvolumes:\n  v:\nsecrets:\n  pw:\n    file: db_password.txt\n",
    );
    let s = d.load(&["compose.yml"], &[]).unwrap();
    let web = service(&s, "web");
    assert_eq!(web.args, ["httpd", "-f", "8080"]);
    assert_eq!(web.env, ["EMPTY=", "K=V"]);
    assert_eq!((web.labels["a"].as_str(), web.labels["b"].as_str(), web.labels["c"].as_str()), ("1", "", "3"));
    assert_eq!(web.health_cmd, "wget -q -O- localhost:8080 || exit 1");
    assert_eq!(web.secret_targets["shop_pw"], "password");
    assert_eq!(web.mounts[0].source, format!("{}/html", d.0.path().display()));
    assert!(web.mounts[0].read_only);
    assert!(web.mounts[1].read_only && web.mounts[1].volume_nocopy);
    assert_eq!(service(&s, "off").health_cmd, "");
    assert_eq!(service(&s, "none").health_cmd, "");
}

/// The example the repository ships (deploy/examples/shop.yml) loads.
#[test]
fn shipped_example_loads() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/shop.yml");
    let s = load(&[file], &HashMap::new(), "shop").unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    assert_eq!(s.services.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(), ["frontend", "backend", "db"]);
    assert_eq!(service(&s, "frontend").ports[0].published, 8080);
    assert_eq!(service(&s, "backend").networks, ["shop_front", "shop_back"]);
    assert_eq!(service(&s, "db").mounts[0].source, "shop_dbdata");
    assert_eq!(service(&s, "db").secret_targets["shop_db_password"], "db_password");
    assert!(service(&s, "frontend").args[2].contains("<h1>The busybox shop</h1>"));
}

#[test]
fn capabilities_ulimits_and_seccomp() {
    let d = Dir::new();
    d.write("prof.json", r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["getpid"],"action":"SCMP_ACT_ERRNO"}]}"#);
    d.write(
        "compose.yml",
        "services:\n  a:\n    image: busybox\n    cap_add: [net_admin]\n    cap_drop: [ALL]\n    ulimits:\n      nproc: 500\n      nofile: {soft: 100, hard: 200}\n    security_opt: ['seccomp:prof.json', 'no-new-privileges:true']\n  b:\n    image: busybox\n    security_opt: [seccomp=unconfined]\n",
    );
    let s = d.load(&["compose.yml"], &[]).unwrap();
    let a = &s.services.iter().find(|x| x.1.name.ends_with("_a")).unwrap().1;
    assert_eq!(a.cap_add, ["CAP_NET_ADMIN"]);
    assert_eq!(a.cap_drop, ["ALL"]);
    assert_eq!(a.ulimits.len(), 2);
    assert!(a.ulimits.iter().any(|u| u.name == "nofile" && u.soft == 100 && u.hard == 200));
    assert!(a.seccomp.contains("getpid"));
    let b = &s.services.iter().find(|x| x.1.name.ends_with("_b")).unwrap().1;
    assert_eq!(b.seccomp, "unconfined");
    for (bad, want) in [
        ("    cap_add: [FLY]\n", "unknown capability"),
        ("    ulimits: {nofile: {soft: 9, hard: 1}}\n", "must not exceed"),
        ("    ulimits: {nofile: {soft: 9}}\n", "both `soft:` and `hard:`"),
        ("    security_opt: ['apparmor:x']\n", "seccomp:unconfined"),
        ("    security_opt: ['seccomp:missing.json']\n", "missing.json"),
    ] {
        d.write("bad.yml", &format!("services:\n  a:\n    image: busybox\n{bad}"));
        let e = d.load(&["bad.yml"], &[]).unwrap_err().to_string();
        assert!(e.contains(want), "{bad}: {e}");
    }
}
