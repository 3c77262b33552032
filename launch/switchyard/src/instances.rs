//! `switchyard instances`: what discovery holds, as a table — every
//! registered endpoint instance with its address, the model it serves, and
//! what its engine offers (for workers in front of external engines).

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
}

/// Prints the table to stdout (problems with single entries go to stderr).
pub(crate) async fn list(
    runtime: Runtime,
    args: InstancesArgs,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
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
        [
            "NAMESPACE",
            "COMPONENT",
            "ENDPOINT",
            "INSTANCE",
            "ADDRESS",
            "MODEL",
            "ENGINE",
        ]
        .map(String::from),
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
        rows.push([
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

fn print_table(rows: &[[String; 7]]) {
    let widths: Vec<usize> = (0..7)
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
