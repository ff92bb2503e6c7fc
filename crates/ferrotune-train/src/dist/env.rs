//! Where this process stands in a job, from the variables its launcher set: torchrun's and
//! Azure ML's PyTorch distribution (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`,
//! `NODE_RANK`, `MASTER_ADDR`, `MASTER_PORT`), or Open MPI's (`OMPI_COMM_WORLD_*`, with
//! `AZ_BATCH_MASTER_NODE` for the address as Azure's MPI jobs give it).

use std::collections::HashMap;

use crate::error::{Result, TrainError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub local_rank: usize,
    pub world: usize,
    pub local_world: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
}

impl RankEnv {
    /// `None` when no launcher set a world (a plain single process).
    pub fn from_env(env: &HashMap<String, String>) -> Result<Option<RankEnv>> {
        fn first(
            env: &HashMap<String, String>,
            names: &[&'static str],
        ) -> Option<(&'static str, String)> {
            names.iter().find_map(|n| {
                env.get(*n)
                    .filter(|v| !v.is_empty())
                    .map(|v| (*n, v.clone()))
            })
        }
        let get = |names: &[&'static str]| first(env, names);
        let num = |names: &[&'static str]| -> Result<Option<usize>> {
            match get(names) {
                None => Ok(None),
                Some((name, v)) => v.trim().parse().map(Some).map_err(|_| {
                    TrainError::config(
                        name,
                        format!("`{v}` is not a number (set by the launcher?)"),
                    )
                }),
            }
        };
        let Some(world) = num(&["WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"])? else {
            return Ok(None);
        };
        let rank = num(&["RANK", "OMPI_COMM_WORLD_RANK"])?
            .ok_or_else(|| TrainError::config("RANK", "WORLD_SIZE is set but RANK is not"))?;
        let local_rank = num(&["LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"])?.unwrap_or(rank);
        let local_world =
            num(&["LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"])?.unwrap_or(world);
        let node_rank = num(&["NODE_RANK", "GROUP_RANK"])?.unwrap_or(rank / local_world.max(1));
        if world == 0 || rank >= world {
            return Err(TrainError::config(
                "RANK",
                format!("rank {rank} is not below WORLD_SIZE {world}"),
            ));
        }
        if local_rank >= local_world {
            return Err(TrainError::config(
                "LOCAL_RANK",
                format!("local rank {local_rank} is not below LOCAL_WORLD_SIZE {local_world}"),
            ));
        }
        let (mut addr, mut port) = (get(&["MASTER_ADDR"]).map(|(_, v)| v), None);
        if addr.is_none() {
            if let Some((_, node)) = get(&["AZ_BATCH_MASTER_NODE"]) {
                let (a, p) = node.rsplit_once(':').unwrap_or((&node, ""));
                addr = Some(a.to_string());
                port = p.parse().ok();
            }
        }
        let port =
            match get(&["MASTER_PORT"]) {
                Some((name, v)) => Some(v.trim().parse::<u16>().map_err(|_| {
                    TrainError::config(name, format!("`{v}` is not a port number"))
                })?),
                None => port,
            };
        if world > 1 && addr.is_none() {
            return Err(TrainError::config(
                "MASTER_ADDR",
                "a job of several ranks needs MASTER_ADDR (rank 0's host)",
            ));
        }
        Ok(Some(RankEnv {
            rank,
            local_rank,
            world,
            local_world,
            node_rank,
            master_addr: addr.unwrap_or_else(|| "127.0.0.1".into()),
            master_port: port.unwrap_or(29500),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn torchrun_azure_and_mpi_variables() {
        assert_eq!(RankEnv::from_env(&env(&[])).unwrap(), None);
        let r = RankEnv::from_env(&env(&[
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "10.0.0.4"),
            ("MASTER_PORT", "6105"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (r.rank, r.local_rank, r.world, r.node_rank, r.master_port),
            (5, 1, 8, 1, 6105)
        );
        let mpi = RankEnv::from_env(&env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("AZ_BATCH_MASTER_NODE", "10.0.0.9:6000"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                mpi.rank,
                mpi.node_rank,
                mpi.master_addr.as_str(),
                mpi.master_port
            ),
            (3, 1, "10.0.0.9", 6000)
        );
        let bad = RankEnv::from_env(&env(&[
            ("RANK", "4"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "x"),
        ]))
        .unwrap_err();
        assert!(bad.to_string().contains("not below WORLD_SIZE"), "{bad}");
        let no_addr = RankEnv::from_env(&env(&[("RANK", "0"), ("WORLD_SIZE", "2")])).unwrap_err();
        assert!(no_addr.to_string().contains("MASTER_ADDR"), "{no_addr}");
    }
}
