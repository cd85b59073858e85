//! The files of `dashboards/`: the Grafana dashboard's structure, and that every metric they
//! name is in the metric catalog (`src/metrics.rs`). Plain file checks, no KVM.

#[allow(dead_code)]
#[path = "../src/metrics.rs"]
mod catalog;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

fn dashboards_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards")
}

fn read(name: &str) -> String {
    let p = dashboards_dir().join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// `understudy_...` names in `text`, with a histogram's `_bucket`/`_sum`/`_count` taken off.
fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("understudy_") {
        let start = i + at;
        let mut end = start + "understudy_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_') {
            end += 1;
        }
        // Part of a longer identifier (e.g. `my_understudy_x`) is not ours.
        let glued = start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let name = text[start..end].trim_end_matches('_');
        if !glued && name.len() > "understudy_".len() {
            out.insert(base_name(name).to_string());
        }
        i = end;
    }
    out
}

fn base_name(name: &str) -> &str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if catalog::CATALOG
                .iter()
                .any(|d| d.name == base && d.kind == catalog::Kind::Histogram)
            {
                return base;
            }
        }
    }
    name
}

fn dashboard_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .expect("dashboards/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for p in list.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

#[test]
fn dashboard_panels_have_datasource_targets_and_positions() {
    let dash: Value = serde_json::from_str(&read("understudy.json")).expect("valid JSON");
    assert!(
        dash["schemaVersion"].as_u64().unwrap_or(0) >= 38,
        "schemaVersion must be >= 38 (Grafana 10+)"
    );
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dash["title"].as_str().is_some_and(|u| !u.is_empty()));
    // The data source is a template variable of type datasource for Prometheus.
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource template variable");
    assert_eq!(ds["query"], "prometheus");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().unwrap());

    let all = panels(&dash);
    let mut ids = HashSet::new();
    let mut problems = Vec::new();
    let mut rows = Vec::new();
    for p in &all {
        let title = p["title"].as_str().unwrap_or("?");
        match p["id"].as_u64() {
            Some(id) => {
                if !ids.insert(id) {
                    problems.push(format!("{title}: id {id} used twice"));
                }
            }
            None => problems.push(format!("{title}: no numeric id")),
        }
        let g = &p["gridPos"];
        if ["h", "w", "x", "y"].iter().any(|k| g[k].as_u64().is_none()) {
            problems.push(format!("{title}: gridPos needs h, w, x, y"));
        } else if g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() > 24 {
            problems.push(format!("{title}: wider than the 24-column grid"));
        }
        if p["type"] == "row" {
            rows.push(title.to_string());
            continue;
        }
        if p["datasource"]["type"] != "prometheus" || p["datasource"]["uid"] != ds_ref.as_str() {
            problems.push(format!(
                "{title}: datasource must be {{type: prometheus, uid: {ds_ref}}}"
            ));
        }
        let targets = p["targets"].as_array().map(Vec::as_slice).unwrap_or(&[]);
        if targets.is_empty() {
            problems.push(format!("{title}: no targets"));
        }
        let mut ref_ids = HashSet::new();
        for t in targets {
            if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                problems.push(format!("{title}: a target without an expr"));
            }
            if !ref_ids.insert(t["refId"].as_str().unwrap_or("").to_string()) {
                problems.push(format!("{title}: refId used twice"));
            }
            if t.get("datasource")
                .is_some_and(|d| d["uid"] != ds_ref.as_str())
            {
                problems.push(format!("{title}: a target with another datasource"));
            }
        }
    }
    // No two panels (top-level rows and panels) overlap on the grid.
    let top: Vec<&Value> = dash["panels"].as_array().unwrap().iter().collect();
    let rect = |p: &Value| {
        let g = &p["gridPos"];
        let v = |k: &str| g[k].as_u64().unwrap_or(0);
        (v("x"), v("y"), v("x") + v("w"), v("y") + v("h"))
    };
    for (i, a) in top.iter().enumerate() {
        for b in &top[i + 1..] {
            let (ra, rb) = (rect(a), rect(b));
            if ra.0 < rb.2 && rb.0 < ra.2 && ra.1 < rb.3 && rb.1 < ra.3 {
                problems.push(format!("{} and {} overlap", a["title"], b["title"]));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "dashboard problems:\n{}",
        problems.join("\n")
    );
    for want in [
        "Protection status",
        "Epoch health",
        "Data reduction",
        "Network",
        "Failover and drills",
        "Migrations",
    ] {
        assert!(rows.iter().any(|r| r == want), "no row {want:?}: {rows:?}");
    }
    assert!(all.len() > rows.len() + 10, "too few panels");
}

#[test]
fn dashboards_and_alerts_name_only_catalog_metrics() {
    let known: HashSet<&str> = catalog::CATALOG.iter().map(|d| d.name).collect();
    let mut unknown = Vec::new();
    let mut named = BTreeSet::new();
    for f in dashboard_files() {
        let text = std::fs::read_to_string(&f).unwrap();
        for n in metric_names(&text) {
            if !known.contains(n.as_str()) {
                unknown.push(format!("{}: {n}", f.file_name().unwrap().to_string_lossy()));
            }
            named.insert(n);
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics named in dashboards/ but not in src/metrics.rs CATALOG:\n{}",
        unknown.join("\n")
    );
    // The files really were read: the dashboard and the alerts name metrics.
    assert!(!metric_names(&read("understudy.json")).is_empty());
    assert!(!metric_names(&read("alerts.yml")).is_empty());
    assert!(named.len() >= 10, "{named:?}");
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(understudy_pause_seconds_bucket{instance=~"$instance"}[5m]))) / understudy_foo_total + my_understudy_x + understudy_"#,
    );
    let v: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(v, ["understudy_foo_total", "understudy_pause_seconds"]);
}

#[test]
fn every_catalog_metric_has_a_panel() {
    let named = metric_names(&read("understudy.json"));
    let missing: Vec<&str> = catalog::CATALOG
        .iter()
        .map(|d| d.name)
        .filter(|n| !named.contains(*n))
        .collect();
    assert!(
        missing.is_empty(),
        "catalog metrics no dashboard panel shows: {missing:?}"
    );
}
