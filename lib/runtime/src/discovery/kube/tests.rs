//! The join and diff on objects shaped as the API server returns them.

use super::*;
use crate::discovery::WatchEvent;
use serde_json::json;

/// A `WorkerMetadata` resource as `kubectl get -o json` shows it.
fn resource(name: &str, pod: Option<&str>, registrations: serde_json::Value) -> WorkerMetadata {
    let owners = match pod {
        Some(pod) => json!([{
            "apiVersion": "v1", "kind": "Pod", "name": pod,
            "uid": "6f1c2d3e-0000-4000-8000-000000000001", "controller": true
        }]),
        None => json!([]),
    };
    serde_json::from_value(json!({
        "apiVersion": "switchyard.dev/v1alpha1",
        "kind": "WorkerMetadata",
        "metadata": {
            "name": name, "namespace": "switchyard", "resourceVersion": "4711",
            "ownerReferences": owners
        },
        "spec": { "registrations": registrations }
    }))
    .unwrap()
}

fn instance(id: u64) -> serde_json::Value {
    json!({"key": format!("v1/instances/dynamo/backend/generate/{id:x}"),
           "value": format!("{{\"instance_id\":{id}}}")})
}

/// An EndpointSlice with one endpoint per `(pod, ready)`.
fn slice(pods: &[(&str, Option<bool>)]) -> EndpointSlice {
    let endpoints: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, (pod, ready))| {
            let mut conditions = json!({"serving": true, "terminating": false});
            if let Some(ready) = ready {
                conditions["ready"] = json!(ready);
            }
            json!({
                "addresses": [format!("10.0.0.{}", i + 10)],
                "conditions": conditions,
                "targetRef": {"kind": "Pod", "name": pod, "namespace": "switchyard", "uid": "u"}
            })
        })
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": "worker-abc12", "labels": {"kubernetes.io/service-name": "worker"}},
        "endpoints": endpoints,
        "ports": [{"name": "rpc", "port": 9000, "protocol": "TCP"}]
    }))
    .unwrap()
}

fn keys(view: &BTreeMap<Key, Bytes>) -> Vec<String> {
    view.keys().map(|k| k.to_string()).collect()
}

#[test]
fn a_ready_pods_registrations_are_visible() {
    let resources = [resource(
        "worker-0",
        Some("worker-0"),
        json!([instance(1), instance(2)]),
    )];
    let view = join(&resources, &ready_pods(&[slice(&[("worker-0", Some(true))])]));
    assert_eq!(
        keys(&view),
        [
            "v1/instances/dynamo/backend/generate/1",
            "v1/instances/dynamo/backend/generate/2"
        ]
    );
    assert_eq!(view.values().next().unwrap(), &Bytes::from("{\"instance_id\":1}"));
}

#[test]
fn a_pod_that_is_not_ready_or_unknown_shows_nothing() {
    let resources = [
        resource("worker-0", Some("worker-0"), json!([instance(1)])),
        resource("worker-1", Some("worker-1"), json!([instance(2)])),
    ];
    let slices = [slice(&[("worker-0", Some(false)), ("worker-1", None)])];
    assert!(join(&resources, &ready_pods(&slices)).is_empty());
}

#[test]
fn a_resource_without_a_pod_owner_and_a_pod_without_a_resource_show_nothing() {
    let resources = [resource("orphan", None, json!([instance(1)]))];
    let slices = [slice(&[("orphan", Some(true)), ("lonely-pod", Some(true))])];
    assert!(join(&resources, &ready_pods(&slices)).is_empty());
}

#[test]
fn null_registrations_and_bad_keys_are_tolerated() {
    let resources = [
        resource("worker-0", Some("worker-0"), serde_json::Value::Null),
        resource(
            "worker-1",
            Some("worker-1"),
            json!([{"key": "not/a/key", "value": "{}"}, instance(7)]),
        ),
    ];
    let view = join(
        &resources,
        &ready_pods(&[slice(&[("worker-0", Some(true)), ("worker-1", Some(true))])]),
    );
    assert_eq!(
        keys(&view),
        ["v1/instances/dynamo/backend/generate/7"],
        "the good entry survives the bad one"
    );
}

#[test]
fn readiness_changes_and_deletions_become_watch_events() {
    let resources = vec![
        resource("worker-0", Some("worker-0"), json!([instance(1)])),
        resource("worker-1", Some("worker-1"), json!([instance(2)])),
    ];
    let both_ready = [slice(&[("worker-0", Some(true)), ("worker-1", Some(true))])];
    let (events, view) = advance(&BTreeMap::new(), &resources, &both_ready);
    assert_eq!(events.len(), 2);
    assert!(events.iter().all(|e| matches!(e, WatchEvent::Put(_))));

    // worker-1 turns not ready: it disappears.
    let one_ready = [slice(&[("worker-0", Some(true)), ("worker-1", Some(false))])];
    let (events, view) = advance(&view, &resources, &one_ready);
    assert_eq!(
        events,
        [WatchEvent::Delete(
            Key::parse("v1/instances/dynamo/backend/generate/2").unwrap()
        )]
    );

    // A resync with the same objects changes nothing.
    let (events, view) = advance(&view, &resources, &one_ready);
    assert!(events.is_empty(), "{events:?}");

    // worker-0's resource is deleted (its Pod went away): it disappears too.
    let (events, view) = advance(&view, &resources[1..], &one_ready);
    assert_eq!(
        events,
        [WatchEvent::Delete(
            Key::parse("v1/instances/dynamo/backend/generate/1").unwrap()
        )]
    );
    assert!(view.is_empty());
}

#[test]
fn a_changed_value_is_a_put() {
    let before = [resource("worker-0", Some("worker-0"), json!([instance(1)]))];
    let ready = [slice(&[("worker-0", Some(true))])];
    let (_, view) = advance(&BTreeMap::new(), &before, &ready);
    let after = [resource(
        "worker-0",
        Some("worker-0"),
        json!([{"key": "v1/instances/dynamo/backend/generate/1", "value": "{\"instance_id\":1,\"v\":2}"}]),
    )];
    let (events, _) = advance(&view, &after, &ready);
    assert!(matches!(&events[..], [WatchEvent::Put(r)] if r.value == "{\"instance_id\":1,\"v\":2}"));
}

#[test]
fn a_pods_instance_id_is_stable_and_fits_in_53_bits() {
    let id = instance_id_for_pod("worker-7d9f8c-x2x4z");
    assert_eq!(id, instance_id_for_pod("worker-7d9f8c-x2x4z"));
    assert_ne!(id, instance_id_for_pod("worker-7d9f8c-x2x4y"));
    assert!(id < (1 << 53));
}
