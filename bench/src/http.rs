//! Load through the router: puts or checked gets over HTTPS (HTTP/2).

use std::sync::Arc;

use anyhow::ensure;

use crate::drive::{Phase, drive};
use crate::workload::{VALUE_LEN, Workload};

/// Where requests go: the client, the router's base URL, and the
/// `Authorization` header value.
pub type RouterTarget = (reqwest::Client, String, String);

/// Puts every key of `workload`, or reads them all back in random order
/// and checks each value, through the router with `streams` requests in
/// flight; `query` (such as `w=quorum`, or empty) is added to every URL.
pub async fn router_phase(
    target: &Arc<RouterTarget>,
    streams: usize,
    workload: &Arc<Workload>,
    gets: bool,
    query: &str,
) -> anyhow::Result<Phase> {
    let (target, workload) = (Arc::clone(target), Arc::clone(workload));
    let order = Arc::new(workload.read_order());
    let query: Arc<str> = if query.is_empty() {
        Arc::from("")
    } else {
        Arc::from(format!("?{query}"))
    };
    drive(streams, workload.len(), move |n| {
        let (target, workload, order, query) = (
            Arc::clone(&target),
            Arc::clone(&workload),
            Arc::clone(&order),
            Arc::clone(&query),
        );
        async move {
            let (client, url, auth) = &*target;
            let i = if gets { order[n] as usize } else { n };
            let key: String = workload
                .key(i)
                .iter()
                .map(|b| format!("%{b:02X}"))
                .collect();
            let url = format!("{url}/v1/kv/{key}{query}");
            if gets {
                let response = client.get(url).header("authorization", auth).send().await?;
                ensure!(
                    response.status().is_success(),
                    "get #{i}: {}",
                    response.status()
                );
                workload.check(i, Some(&response.bytes().await?))?;
            } else {
                let mut value = [0u8; VALUE_LEN];
                workload.value_into(i, &mut value);
                let response = client
                    .put(url)
                    .header("authorization", auth)
                    .body(value.to_vec())
                    .send()
                    .await?;
                ensure!(
                    response.status().is_success(),
                    "put #{i}: {}",
                    response.status()
                );
            }
            Ok(())
        }
    })
    .await
}
