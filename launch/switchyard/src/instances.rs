//! `switchyard instances`: what discovery holds, as a table — every
//! registered endpoint instance with its address, the model it serves, and
//! what its engine offers (for workers in front of external engines). With
//! `--frontend URL`, what that frontend sees instead (its `/api/mesh`):
//! each worker's load, ejection and last error.

use std::collections::BTreeMap;
use switchyard_llm::model_card::ModelCard;
use switchyard_runtime::discovery::{Bucket, Key, Query};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::error::Report;
use switchyard_runtime::instance::Instance;
use switchyard_runtime::request_plane::Transport;
use switchyard_runtime::runtime::Runtime;

/// Flags of `switchyard instances`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct InstancesArgs {
    /// Only this namespace.
    #[arg(long, env = "DYN_NAMESPACE")]
    pub(crate) namespace: Option<String>,
    /// Ask this frontend (`http://host:8000`) for the workers it routes to,
    /// with their load and state, instead of reading discovery.
    #[arg(long, value_name = "URL")]
    pub(crate) frontend: Option<String>,
    /// The API key for --frontend, when it has keys set.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub(crate) api_key: Option<String>,
}

/// Longest wait for the frontend's answer.
const FRONTEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Prints the table to stdout (problems with single entries go to stderr).
pub(crate) async fn list(
    runtime: Runtime,
    args: InstancesArgs,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    if let Some(url) = &args.frontend {
        return from_frontend(url, args.api_key.as_deref(), args.namespace.as_deref()).await;
    }
    let drt = DistributedRuntime::connect(runtime).await?;
    let narrow = |query: Query| match &args.namespace {
        Some(namespace) => query.namespace(namespace.clone()),
        None => query,
    };
    // The model served by each endpoint instance, keyed like its instance.
    let mut models = BTreeMap::<Key, (String, String)>::new();
    for registration in drt.discovery().list(&narrow(Query::bucket(Bucket::Models))).await? {
        match ModelCard::from_registration(&registration) {
            Ok(card) => {
                let mut key = card.key();
                key.bucket = Bucket::Instances;
                let engine = card.engine.as_ref().map_or_else(|| "-".to_string(), |e| e.describe());
                models.insert(key, (card.name, engine));
            }
            Err(error) => eprintln!("skipping {}: {}", registration.key, Report(&error)),
        }
    }
    let mut rows = vec![
        vec![
            "NAMESPACE",
            "COMPONENT",
            "ENDPOINT",
            "INSTANCE",
            "ADDRESS",
            "MODEL",
            "ENGINE",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    ];
    for registration in drt.discovery().list(&narrow(Query::bucket(Bucket::Instances))).await? {
        let instance = match Instance::from_registration(&registration) {
            Ok(instance) => instance,
            Err(error) => {
                eprintln!("skipping {}: {}", registration.key, Report(&error));
                continue;
            }
        };
        let address = match &instance.transport {
            Transport::Tcp(address) => format!("tcp://{address}"),
            Transport::Http(base) => base.clone(),
            Transport::Nats(subject) => format!("nats:{subject}"),
        };
        let (model, engine) = models
            .get(&instance.key())
            .cloned()
            .unwrap_or_else(|| ("-".into(), "-".into()));
        rows.push(vec![
            instance.namespace.clone(),
            instance.component.clone(),
            instance.endpoint.clone(),
            format!("{:x}", instance.instance_id),
            address,
            model,
            engine,
        ]);
    }
    print_table(&rows);
    Ok(())
}

/// The workers `url`'s frontend routes to, from its `/api/mesh`.
async fn from_frontend(
    url: &str,
    api_key: Option<&str>,
    namespace: Option<&str>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let client = reqwest::Client::builder().timeout(FRONTEND_TIMEOUT).build()?;
    let mut request = client.get(format!("{}/api/mesh", url.trim_end_matches('/')));
    if let Some(key) = api_key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await?;
    let status = response.status();
    if !status.is_success() {
        let hint = match status.as_u16() {
            401 => " (give its API key: --api-key or OPENAI_API_KEY)",
            404 => " (is it a Switchyard frontend with --mesh-page on?)",
            _ => "",
        };
        return Err(format!("{url}/api/mesh answered {status}{hint}").into());
    }
    let mesh: serde_json::Value = response.json().await?;
    let text = |value: &serde_json::Value| match value {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let mut rows = vec![
        [
            "MODEL",
            "NAMESPACE",
            "COMPONENT",
            "ENDPOINT",
            "INSTANCE",
            "ADDRESS",
            "INFLIGHT",
            "REPORTED",
            "STATE",
            "LAST_ERROR",
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>(),
    ];
    let none = Vec::new();
    for model in mesh["models"].as_array().unwrap_or(&none) {
        for instance in model["instances"].as_array().unwrap_or(&none) {
            if namespace.is_some_and(|ns| instance["namespace"].as_str() != Some(ns)) {
                continue;
            }
            let state = if instance["ejected"] == true {
                format!("ejected {}ms", text(&instance["ejected_for_ms"]))
            } else {
                "ok".to_string()
            };
            rows.push(vec![
                text(&model["name"]),
                text(&instance["namespace"]),
                text(&instance["component"]),
                text(&instance["endpoint"]),
                text(&instance["id"]),
                match (instance["request_plane"].as_str(), text(&instance["address"])) {
                    (Some("tcp"), address) => format!("tcp://{address}"),
                    (Some("nats"), subject) => format!("nats:{subject}"),
                    (_, address) => address,
                },
                text(&instance["inflight"]),
                text(&instance["reported_load"]),
                state,
                text(&instance["last_error"]["message"]),
            ]);
        }
    }
    print_table(&rows);
    Ok(())
}

fn print_table(rows: &[Vec<String>]) {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
    if rows.len() == 1 {
        println!("(no instances registered)");
    }
}
