//! The command line against its documentation, and the deploy manifests.

use super::Cli;
use clap::CommandFactory;
use std::collections::BTreeMap;
use std::path::Path;

fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

/// Every leaf command as "switchyard a b", with its long flags and their variables.
fn commands() -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    fn walk(command: &clap::Command, path: &str, out: &mut BTreeMap<String, BTreeMap<String, Option<String>>>) {
        let path = format!("{path} {}", command.get_name()).trim().to_string();
        let subcommands: Vec<_> = command.get_subcommands().filter(|s| s.get_name() != "help").collect();
        if subcommands.is_empty() {
            let flags = command
                .get_arguments()
                .filter_map(|arg| {
                    let long = arg.get_long()?;
                    (long != "help" && long != "version").then(|| {
                        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                        (format!("--{long}"), env)
                    })
                })
                .collect();
            out.insert(path.clone(), flags);
        }
        for sub in subcommands {
            walk(sub, &path, out);
        }
    }
    let mut out = BTreeMap::new();
    walk(&Cli::command(), "", &mut out);
    out
}

/// The flag tables of docs/configuration.md, by `### \`switchyard …\`` section.
fn documented() -> BTreeMap<String, BTreeMap<String, Option<String>>> {
    let page = repo_file("docs/configuration.md");
    let mut out: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
    let mut section = None;
    for line in page.lines() {
        if let Some(title) = line.strip_prefix("### `") {
            section = title
                .strip_suffix('`')
                .filter(|t| t.starts_with("switchyard"))
                .map(str::to_string);
            if let Some(name) = &section {
                out.entry(name.clone()).or_default();
            }
            continue;
        }
        let Some(name) = &section else { continue };
        let Some(row) = line.strip_prefix("| `--") else {
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let flag = format!("--{}", cells[0].trim_end_matches('`'));
        let env = cells
            .get(1)
            .and_then(|c| c.strip_prefix('`'))
            .and_then(|c| c.strip_suffix('`'))
            .map(str::to_string);
        out.entry(name.clone()).or_default().insert(flag, env);
    }
    out
}

#[test]
fn every_command_flag_and_variable_is_documented_and_nothing_else() {
    let code = commands();
    let docs = documented();
    for (command, flags) in &code {
        let Some(documented) = docs.get(command) else {
            panic!("docs/configuration.md has no section ### `{command}`");
        };
        // `run` takes the frontend's and the mocker's flags; its section points there.
        if command == "switchyard run" {
            continue;
        }
        // The vLLM stand-in takes its own few flags plus the mocker's engine flags.
        let mut documented = documented.clone();
        if command == "switchyard mocker-vllm serve" {
            documented.extend(code["switchyard worker mocker"].clone());
        }
        assert_eq!(
            &documented, flags,
            "flags of `{command}`: docs/configuration.md (left) vs the code (right)"
        );
    }
    for command in docs.keys() {
        assert!(
            code.contains_key(command),
            "docs/configuration.md documents `{command}`, which does not exist"
        );
    }
}

#[test]
fn the_run_command_takes_exactly_the_frontend_and_mocker_flags() {
    let code = commands();
    let mut expected = code["switchyard frontend"].clone();
    expected.extend(code["switchyard worker mocker"].clone());
    assert_eq!(code["switchyard run"], expected);
}

/// Every document of every manifest under deploy/k8s parses and has what
/// Kubernetes requires; workloads probe /live and /health.
#[test]
fn the_kubernetes_manifests_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/k8s");
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(document)
                .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
            if value.is_null() {
                continue;
            }
            let field = |name: &str| {
                value
                    .get(name)
                    .unwrap_or_else(|| panic!("{}: no {name}", path.display()))
            };
            let kind = field("kind").as_str().unwrap().to_string();
            field("apiVersion");
            assert!(
                field("metadata").get("name").and_then(|n| n.as_str()).is_some(),
                "{}: a {kind} without metadata.name",
                path.display()
            );
            if kind == "Deployment" || kind == "StatefulSet" {
                let pod = &value["spec"]["template"]["spec"];
                assert!(
                    value["spec"]["selector"].is_mapping(),
                    "{}: {kind} without selector",
                    path.display()
                );
                let containers = pod["containers"].as_sequence().expect("containers");
                assert!(!containers.is_empty());
                for container in containers {
                    assert!(
                        container["image"].is_string(),
                        "{}: a container without image",
                        path.display()
                    );
                    let is_switchyard = container["image"].as_str().unwrap().contains("switchyard");
                    if is_switchyard {
                        assert_eq!(
                            container["livenessProbe"]["httpGet"]["path"].as_str(),
                            Some("/live"),
                            "{}",
                            path.display()
                        );
                        assert_eq!(
                            container["readinessProbe"]["httpGet"]["path"].as_str(),
                            Some("/health"),
                            "{}",
                            path.display()
                        );
                    }
                }
            }
            kinds.push(kind);
        }
    }
    for needed in [
        "Deployment",
        "Service",
        "CustomResourceDefinition",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ] {
        assert!(
            kinds.iter().any(|k| k == needed),
            "deploy/k8s has no {needed}: {kinds:?}"
        );
    }
}

#[test]
fn the_compose_file_and_dashboard_parse_and_reference_real_metrics() {
    let compose: serde_yaml::Value = serde_yaml::from_str(&repo_file("deploy/compose/docker-compose.yml")).unwrap();
    let services = compose["services"].as_mapping().expect("services");
    for name in ["etcd", "nats", "frontend", "prometheus", "grafana"] {
        assert!(services.contains_key(name), "compose has no {name} service");
    }
    for (name, service) in services {
        assert!(
            service["healthcheck"].is_mapping(),
            "compose service {name:?} has no healthcheck"
        );
    }
    let dashboard: serde_json::Value = serde_json::from_str(&repo_file("deploy/grafana/switchyard.json")).unwrap();
    let panels = dashboard["panels"].as_array().expect("panels");
    let text = dashboard.to_string();
    assert!(panels.len() >= 6, "{} panels", panels.len());
    for metric in [
        "dynamo_frontend_requests_total",
        "dynamo_frontend_time_to_first_token_seconds",
        "dynamo_frontend_inter_token_latency_seconds",
        "dynamo_component_inflight_requests",
        "dynamo_frontend_model_rejection_total",
        "dynamo_router_ejections_total",
    ] {
        assert!(text.contains(metric), "the dashboard does not use {metric}");
    }
}

use serde::Deserialize;

/// The tutorial's code blocks are cut from an example that `cargo test` builds.
#[test]
fn every_rust_block_of_the_worker_tutorial_is_in_the_compiled_example() {
    let doc = repo_file("docs/writing-a-worker.md");
    let example = repo_file("lib/runtime/examples/writing_a_worker.rs");
    let blocks: Vec<&str> = doc
        .split("```rust\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default())
        .collect();
    assert!(blocks.len() >= 4, "the tutorial has {} rust blocks", blocks.len());
    for block in blocks {
        assert!(
            example.contains(block.trim_end()),
            "this block of docs/writing-a-worker.md is not in examples/writing_a_worker.rs:\n{block}"
        );
    }
}

/// A merge that left its conflict markers in prose would still build.
#[test]
fn no_page_of_the_docs_holds_merge_conflict_markers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut pages = vec![root.join("README.md")];
    for dir in ["docs", "docs/adr"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "md") {
                pages.push(path);
            }
        }
    }
    let marked: Vec<String> = pages
        .iter()
        .flat_map(|page| {
            let text = std::fs::read_to_string(page).unwrap();
            text.lines()
                .enumerate()
                .filter(|(_, line)| line.starts_with("<<<<<<< ") || line.starts_with(">>>>>>> ") || *line == "=======")
                .map(|(n, _)| format!("{}:{}", page.display(), n + 1))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(marked.is_empty(), "conflict markers at {marked:?}");
}
