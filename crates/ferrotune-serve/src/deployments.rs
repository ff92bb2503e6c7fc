//! Named deployments behind one endpoint and the traffic split between them, as Azure ML's
//! managed online endpoints have them: weights in percent summing to 100, a request may pin a
//! deployment with `azureml-model-deployment`, and the split changes without a restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ferrotune_data::{ChatTemplate, Tokenizer};
use ferrotune_model::rng::{SplitMix, GAMMA};

use crate::engine::EngineHandle;

/// One deployment: a model with its tokenizer and engine.
pub struct Deployment {
    pub name: String,
    /// What it serves (folder or registry name), for `/v1/models` and logs.
    pub model: String,
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub template: Arc<ChatTemplate>,
}

pub struct Endpoint {
    pub deployments: Vec<Deployment>,
    traffic: RwLock<Vec<(String, u32)>>,
    draws: AtomicU64,
}

/// Parse `blue=90,green=10` (repeatable flags are joined first).
pub fn parse_traffic(text: &str) -> Result<Vec<(String, u32)>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, pct) = part
            .split_once('=')
            .ok_or_else(|| format!("traffic {part:?}: expected NAME=PERCENT"))?;
        let pct: u32 = pct
            .trim()
            .parse()
            .map_err(|_| format!("traffic {part:?}: the percentage is not a whole number"))?;
        out.push((name.trim().to_string(), pct));
    }
    Ok(out)
}

impl Endpoint {
    /// `traffic` empty: everything to the only deployment (an error if there are several).
    pub fn new(
        deployments: Vec<Deployment>,
        traffic: Vec<(String, u32)>,
    ) -> Result<Endpoint, String> {
        let traffic = if traffic.is_empty() {
            if deployments.len() != 1 {
                return Err("several deployments need --traffic NAME=PERCENT,...".into());
            }
            vec![(deployments[0].name.clone(), 100)]
        } else {
            traffic
        };
        let ep = Endpoint {
            deployments,
            traffic: RwLock::new(Vec::new()),
            draws: AtomicU64::new(GAMMA),
        };
        ep.set_traffic(traffic)?;
        Ok(ep)
    }

    pub fn traffic(&self) -> Vec<(String, u32)> {
        self.traffic.read().expect("traffic lock").clone()
    }

    /// Replace the split: names must be deployments, percentages sum to 100 (Azure's rule).
    pub fn set_traffic(&self, traffic: Vec<(String, u32)>) -> Result<(), String> {
        for (name, _) in &traffic {
            if self.get(name).is_none() {
                return Err(format!(
                    "traffic names deployment {name:?}, which does not exist (deployments: {})",
                    self.names().join(", ")
                ));
            }
        }
        let total: u32 = traffic.iter().map(|(_, p)| p).sum();
        if total != 100 {
            return Err(format!(
                "traffic percentages sum to {total}; they must sum to 100"
            ));
        }
        *self.traffic.write().expect("traffic lock") = traffic;
        Ok(())
    }

    pub fn names(&self) -> Vec<String> {
        self.deployments.iter().map(|d| d.name.clone()).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Deployment> {
        self.deployments.iter().find(|d| d.name == name)
    }

    /// The pinned deployment, else one drawn by the traffic weights.
    pub fn route(&self, pinned: Option<&str>) -> Result<&Deployment, String> {
        if let Some(name) = pinned {
            return self.get(name).ok_or_else(|| {
                format!(
                    "deployment {name:?} does not exist (deployments: {})",
                    self.names().join(", ")
                )
            });
        }
        let traffic = self.traffic();
        // splitmix64 draws: cheap, lock-free, and uniform enough for a traffic split.
        let state = self.draws.fetch_add(GAMMA, Ordering::Relaxed);
        let mut draw = (SplitMix(state).next_u64() % 100) as u32;
        for (name, pct) in &traffic {
            if draw < *pct {
                return Ok(self.get(name).expect("validated"));
            }
            draw -= pct;
        }
        Err("no deployment receives traffic (all weights are 0); pin one with azureml-model-deployment".into())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_traffic;

    #[test]
    fn traffic_parses_and_names_its_mistakes() {
        assert_eq!(
            parse_traffic("blue=90, green=10").unwrap(),
            vec![("blue".into(), 90), ("green".into(), 10)]
        );
        assert!(parse_traffic("blue").unwrap_err().contains("NAME=PERCENT"));
        assert!(parse_traffic("blue=ninety")
            .unwrap_err()
            .contains("whole number"));
    }
}
