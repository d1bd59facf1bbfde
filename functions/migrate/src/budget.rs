//! The stack's connection budget, checked on every deploy before anything
//! is migrated: the most connections the functions can hold at once (each
//! function's pool size times its greatest concurrency) against the share
//! of the database the stack is given (`DatabaseMaxConnections`), and that
//! share against what the server really accepts. A deploy that could
//! exhaust the database under a traffic spike fails with the arithmetic,
//! instead of failing later with "too many connections".
//!
//! The template passes the figures as the custom resource's
//! `ConnectionBudget` property (CloudFormation sends every value as a
//! string); a request without it is not checked.

use serde_json::Value;

/// The figures of one deploy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Connections the stack may use (`DatabaseMaxConnections`).
    pub limit: u64,
    /// Connections each function instance's pool holds at most.
    pub pool_size: u64,
    /// The API function's reserved concurrency.
    pub api: u64,
    /// The realtime function's reserved concurrency (0 for a stack made
    /// before it existed).
    pub realtime: u64,
    /// The worker's maximum concurrency per queue, and how many queues it
    /// reads (each event source mapping scales on its own).
    pub worker_per_queue: u64,
    pub worker_queues: u64,
    /// Through RDS Proxy: the functions' connections are the proxy's
    /// clients, multiplexed onto fewer database connections, so only the
    /// proxy's own limit applies.
    pub via_proxy: bool,
}

impl Budget {
    /// The budget in a request's properties, if it carries one.
    pub fn from_properties(properties: &Value) -> Result<Option<Budget>, String> {
        let Some(b) = properties.get("ConnectionBudget") else {
            return Ok(None);
        };
        let num = |key: &str| -> Result<u64, String> {
            let v = b
                .get(key)
                .ok_or(format!("ConnectionBudget.{key} is missing"))?;
            let parsed = match v {
                Value::String(s) => s.trim().parse::<u64>().ok(),
                other => other.as_u64(),
            };
            parsed.ok_or(format!("ConnectionBudget.{key} is {v}, not a whole number"))
        };
        Ok(Some(Budget {
            limit: num("DatabaseMaxConnections")?,
            pool_size: num("PoolSize")?,
            api: num("ApiConcurrency")?,
            realtime: match b.get("RealtimeConcurrency") {
                None => 0,
                Some(_) => num("RealtimeConcurrency")?,
            },
            worker_per_queue: num("WorkerConcurrencyPerQueue")?,
            worker_queues: num("WorkerQueues")?,
            via_proxy: match b.get("ViaProxy") {
                Some(Value::Bool(v)) => *v,
                Some(Value::String(s)) => s == "true",
                _ => false,
            },
        }))
    }

    /// The most connections the functions can hold at once: every instance
    /// of the API, the realtime function, the worker on every queue and the
    /// one scheduler with a full pool, and this function's single connection.
    pub fn demand(&self) -> u64 {
        let instances = self.api + self.realtime + self.worker_per_queue * self.worker_queues + 1;
        self.pool_size * instances + 1
    }

    /// How the demand is made up, for messages.
    pub fn explain(&self) -> String {
        format!(
            "pool {} x (api {} + realtime {} + worker {} queues x {} + scheduler 1) + migrate 1 = {}",
            self.pool_size,
            self.api,
            self.realtime,
            self.worker_queues,
            self.worker_per_queue,
            self.demand()
        )
    }

    /// Whether the budget holds on a server that accepts `server_capacity`
    /// connections from ordinary roles (`max_connections` less those
    /// reserved for superusers); the reason when it does not.
    pub fn check(&self, server_capacity: Option<u64>) -> Result<String, String> {
        if self.via_proxy {
            return Ok(format!(
                "through RDS Proxy: up to {} client connections, multiplexed by the proxy",
                self.demand()
            ));
        }
        if self.demand() > self.limit {
            return Err(format!(
                "connection budget exceeded: the functions can hold {} connections ({}) \
                 but DatabaseMaxConnections is {}; lower ApiMaxConcurrency, \
                 RealtimeMaxConcurrency, WorkerMaxConcurrency or DatabasePoolSize, raise DatabaseMaxConnections, \
                 or put RDS Proxy in front (DatabaseProxyTarget)",
                self.demand(),
                self.explain(),
                self.limit
            ));
        }
        if let Some(capacity) = server_capacity {
            if self.limit > capacity {
                return Err(format!(
                    "connection budget exceeded: DatabaseMaxConnections is {} but the server \
                     accepts {capacity} connections (max_connections less those reserved for \
                     superusers); lower DatabaseMaxConnections or raise max_connections",
                    self.limit
                ));
            }
        }
        Ok(format!("{} of {} connections", self.demand(), self.limit))
    }
}

/// Connections the server accepts from ordinary roles.
pub async fn server_capacity(database_url: &str) -> Result<u64, String> {
    let client = offload::db::connect(database_url)
        .await
        .map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT current_setting('max_connections')::int8 \
                    - current_setting('superuser_reserved_connections')::int8 \
                    - coalesce(current_setting('reserved_connections', true)::int8, 0)",
            &[],
        )
        .await
        .map_err(|e| format!("cannot read max_connections: {e}"))?;
    Ok(row.get::<_, i64>(0).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn budget(limit: u64, api: u64, worker: u64) -> Budget {
        Budget {
            limit,
            pool_size: 2,
            api,
            realtime: 0,
            worker_per_queue: worker,
            worker_queues: 3,
            via_proxy: false,
        }
    }

    #[test]
    fn the_demand_counts_every_instance_with_a_full_pool() {
        // 2 x (10 + 3 x 20 + 1) + 1
        assert_eq!(budget(200, 10, 20).demand(), 143);
        assert_eq!(
            budget(200, 10, 20).check(Some(500)).unwrap(),
            "143 of 200 connections"
        );
    }

    #[test]
    fn over_the_limit_fails_with_the_arithmetic() {
        let err = budget(100, 10, 20).check(None).unwrap_err();
        assert!(
            err.contains("can hold 143 connections")
                && err.contains(
                    "pool 2 x (api 10 + realtime 0 + worker 3 queues x 20 + scheduler 1)"
                )
                && err.contains("DatabaseMaxConnections is 100"),
            "{err}"
        );
        let err = budget(150, 10, 20).check(Some(97)).unwrap_err();
        assert!(err.contains("the server accepts 97"), "{err}");
        let mut proxied = budget(100, 10, 20);
        proxied.via_proxy = true;
        assert!(proxied.check(Some(97)).is_ok());
    }

    #[test]
    fn properties_come_as_strings_and_bad_ones_are_named() {
        let p = json!({"ConnectionBudget": {
            "DatabaseMaxConnections": "90", "PoolSize": "2", "ApiConcurrency": "10",
            "WorkerConcurrencyPerQueue": "10", "WorkerQueues": "3", "ViaProxy": "false"
        }});
        assert_eq!(
            Budget::from_properties(&p).unwrap(),
            Some(budget(90, 10, 10))
        );
        assert_eq!(
            Budget::from_properties(&json!({"CodeVersion": "3"})).unwrap(),
            None
        );
        let mut with_realtime = p.clone();
        with_realtime["ConnectionBudget"]["RealtimeConcurrency"] = json!("2");
        let b = Budget::from_properties(&with_realtime).unwrap().unwrap();
        assert_eq!(b.realtime, 2);
        // 2 x (10 + 2 + 3 x 10 + 1) + 1
        assert_eq!(b.demand(), 87);
        let bad = json!({"ConnectionBudget": {"DatabaseMaxConnections": "lots"}});
        assert_eq!(
            Budget::from_properties(&bad).unwrap_err(),
            "ConnectionBudget.DatabaseMaxConnections is \"lots\", not a whole number"
        );
    }
}
