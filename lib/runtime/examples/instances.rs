//! Lists what discovery holds, as a table: every registered endpoint
//! instance with its address. Until the `switchyard instances` command
//! lands (the CLI issue), this example stands in for it:
//!
//! ```text
//! DYN_DISCOVERY_BACKEND=etcd ETCD_ENDPOINTS=http://127.0.0.1:2379 cargo run --example instances
//! DYN_DISCOVERY_BACKEND=file DYN_FILE_KV=/tmp/switchyard_kv cargo run --example instances
//! ```
//!
//! An optional argument narrows the list to one namespace.

use switchyard_runtime::component::Instance;
use switchyard_runtime::config::RuntimeConfig;
use switchyard_runtime::discovery::{Bucket, Query};
use switchyard_runtime::distributed::DistributedRuntime;
use switchyard_runtime::request_plane::Transport;
use switchyard_runtime::runtime::Runtime;
use switchyard_runtime::worker::Worker;

fn main() -> anyhow::Result<()> {
    let namespace = std::env::args().nth(1);
    // Only warnings: the table is the output.
    let config = RuntimeConfig::from_settings()?;
    Worker::from_config(config)?.execute(move |rt: Runtime| async move {
        let drt = DistributedRuntime::from_settings(rt).await?;
        let mut query = Query::bucket(Bucket::Instances);
        if let Some(namespace) = namespace {
            query = query.namespace(namespace);
        }
        let mut rows = vec![["NAMESPACE", "COMPONENT", "ENDPOINT", "INSTANCE", "ADDRESS"].map(String::from)];
        for registration in drt.discovery().list(&query).await? {
            match Instance::from_registration(&registration) {
                Ok(instance) => {
                    let address = match &instance.transport {
                        Transport::Tcp(address) => format!("tcp://{address}"),
                        Transport::Http(base) => base.clone(),
                        Transport::Nats(subject) => format!("nats:{subject}"),
                    };
                    rows.push([
                        instance.namespace.clone(),
                        instance.component.clone(),
                        instance.endpoint.clone(),
                        format!("{:x}", instance.instance_id),
                        address,
                    ]);
                }
                Err(error) => eprintln!("skipping {}: {error}", registration.key),
            }
        }
        print_table(&rows);
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(())
}

fn print_table(rows: &[[String; 5]]) {
    let widths: Vec<usize> = (0..5)
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
