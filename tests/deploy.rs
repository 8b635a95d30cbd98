//! The deployment examples under `deploy/` stay true: the regtee config inside the Kubernetes
//! manifests loads with regtee's own loader and agrees with the manifests around it, and the
//! nginx front passes `nginx -t`.

use std::path::Path;

use regtee::config::Config;

fn repo_file(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).unwrap()
}

/// The block under `key: |` in a YAML document, unindented.
fn literal_block(yaml: &str, key: &str) -> String {
    let mut lines = yaml.lines().skip_while(|l| l.trim() != format!("{key}: |"));
    let header = lines.next().expect("the block's key");
    let outer = header.len() - header.trim_start().len();
    let body: Vec<&str> = lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > outer)
        .collect();
    let indent = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    body.iter()
        .map(|l| l.get(indent..).unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value after `key:` on the first line that has it.
fn scalar<'a>(yaml: &'a str, key: &str) -> &'a str {
    yaml.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{key} in the manifests"))
}

#[test]
fn the_kubernetes_example_holds_a_config_regtee_loads_and_agrees_with() {
    let manifests = repo_file("deploy/kubernetes/regtee.yaml");
    let toml = literal_block(&manifests, "regtee.toml");
    // Every secret the config reads comes from the Deployment's environment.
    let env_names: Vec<String> = manifests
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- name: REGTEE_"))
        .map(|rest| format!("REGTEE_{}", rest.trim()))
        .collect();
    let env = move |name: &str| env_names.iter().any(|n| n == name).then(|| "x".to_string());
    let config = Config::parse(&toml, Path::new("/etc/regtee/regtee.toml"), &env)
        .unwrap_or_else(|e| panic!("deploy/kubernetes/regtee.yaml: {e}\n{toml}"));

    let database = config
        .state
        .database
        .expect("the replicas share a PostgreSQL queue");
    assert!(
        database.tls,
        "the example verifies the database's certificate"
    );
    let admin = config.admin.expect("an admin listener for the probes");
    assert!(manifests.contains(&format!("containerPort: {}", admin.listen.port())));
    assert!(manifests.contains("httpGet: {path: /readyz, port: admin}"));
    let proxy = config.proxy.listen.expect("a plain listener");
    assert!(manifests.contains(&format!("containerPort: {}", proxy.port())));
    let grace: u64 = scalar(&manifests, "terminationGracePeriodSeconds")
        .parse()
        .unwrap();
    assert!(
        grace > config.proxy.shutdown_grace.as_secs(),
        "Kubernetes must wait longer than shutdown_grace"
    );
    let replicas: u32 = scalar(&manifests, "replicas").parse().unwrap();
    assert!(replicas >= 2);
    assert!(manifests.contains("kind: PodDisruptionBudget"));
}

#[test]
fn the_nginx_front_for_two_replicas_passes_nginx_t() {
    let prefix = tempfile::tempdir().unwrap();
    std::fs::create_dir(prefix.path().join("tmp")).unwrap();
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/regtee-replicas.conf");
    let out = std::process::Command::new("nginx")
        .arg("-t")
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(&conf)
        .output()
        .expect("nginx is installed (apt-get install nginx-light)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
