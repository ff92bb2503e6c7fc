//! The CPU backend: ranks talk to rank 0 over TCP (a star: rank 0 sums in rank order and sends
//! the result back, so every rank gets the same bits). Rendezvous happens on the same sockets:
//! each rank says who it is, which ferrotune it runs and which training it means (config hash);
//! rank 0 admits the job only when all ranks agree, and hands out the NCCL id for the GPU backend.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{flatten, unflatten, Communicator, RankEnv, Solo};
use crate::error::{Result, TrainError};

const HELLO: u32 = 1;
const WELCOME: u32 = 2;
const DATA: u32 = 3;

/// What every rank of a job must agree on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobIdentity {
    pub version: String,
    pub config_hash: String,
}

#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// How long a collective waits for a peer.
    pub timeout: Duration,
    /// How long rank 0 waits for every rank to join (and others for rank 0 to listen).
    pub join_timeout: Duration,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    rank: usize,
    world: usize,
    host: String,
    identity: JobIdentity,
}

#[derive(Serialize, Deserialize)]
struct Welcome {
    error: Option<String>,
    /// Bytes of an NCCL unique id, when rank 0 made one.
    nccl_id: Option<Vec<u8>>,
}

pub struct TcpComm {
    rank: usize,
    world: usize,
    /// Rank 0: a stream to each other rank (index = rank; 0 unused). Others: one, to rank 0.
    peers: Vec<Option<TcpStream>>,
    timeout: Duration,
    /// The NCCL id rank 0 handed out at rendezvous.
    pub nccl_id: Option<Vec<u8>>,
}

impl TcpComm {
    /// Joins the job described by `env`. Rank 0 listens on `MASTER_PORT` (all interfaces) and
    /// `nccl_id` (rank 0 only) is passed to every rank.
    pub fn join(
        env: &RankEnv,
        identity: &JobIdentity,
        opts: &TcpOptions,
        nccl_id: Option<Vec<u8>>,
    ) -> Result<TcpComm> {
        let mut comm = TcpComm {
            rank: env.rank,
            world: env.world,
            peers: (0..env.world).map(|_| None).collect(),
            timeout: opts.timeout,
            nccl_id: None,
        };
        if env.world == 1 {
            comm.nccl_id = nccl_id;
            return Ok(comm);
        }
        if env.rank == 0 {
            comm.admit(env, identity, opts, nccl_id)?;
        } else {
            comm.knock(env, identity, opts)?;
        }
        Ok(comm)
    }

    fn admit(
        &mut self,
        env: &RankEnv,
        identity: &JobIdentity,
        opts: &TcpOptions,
        nccl_id: Option<Vec<u8>>,
    ) -> Result<()> {
        let listener = TcpListener::bind(("0.0.0.0", env.master_port)).map_err(|e| {
            TrainError::Distributed(format!(
                "rank 0 cannot listen on port {} ({e}); set MASTER_PORT (--master-port) to a free port",
                env.master_port
            ))
        })?;
        listener.set_nonblocking(true).map_err(io("listen"))?;
        let deadline = Instant::now() + opts.join_timeout;
        let mut joined = BTreeSet::new();
        while joined.len() + 1 < env.world {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(io("accept"))?;
                    self.configure(&stream)?;
                    let mut stream = stream;
                    stream
                        .set_read_timeout(Some(opts.join_timeout))
                        .map_err(io("accept"))?;
                    let (kind, body) = read_frame(&mut stream)
                        .map_err(|e| link_error(&e, 0, "rendezvous", opts.join_timeout))?;
                    let hello: Hello = match (kind, serde_json::from_slice(&body)) {
                        (HELLO, Ok(h)) => h,
                        _ => continue, // not one of ours (a port scanner, say)
                    };
                    let problem = if hello.world != env.world {
                        Some(format!(
                            "rank {} on {} was started with WORLD_SIZE {}, rank 0 with {}",
                            hello.rank, hello.host, hello.world, env.world
                        ))
                    } else if hello.rank == 0
                        || hello.rank >= env.world
                        || joined.contains(&hello.rank)
                    {
                        Some(format!(
                            "two processes claim rank {} (the second on {})",
                            hello.rank, hello.host
                        ))
                    } else if hello.identity.version != identity.version {
                        Some(format!(
                            "rank {} on {} runs ferrotune {}, rank 0 runs {}: use the same binary everywhere",
                            hello.rank, hello.host, hello.identity.version, identity.version
                        ))
                    } else if hello.identity.config_hash != identity.config_hash {
                        Some(format!(
                            "rank {} on {} trains with other settings (config hash {} vs rank 0's {}): give every rank the same config and --set flags",
                            hello.rank, hello.host, hello.identity.config_hash, identity.config_hash
                        ))
                    } else {
                        None
                    };
                    if let Some(why) = problem {
                        let refusal = Welcome {
                            error: Some(why.clone()),
                            nccl_id: None,
                        };
                        let _ = write_json(&mut stream, WELCOME, &refusal);
                        for s in self.peers.iter_mut().flatten() {
                            let _ = write_json(s, WELCOME, &refusal);
                        }
                        return Err(TrainError::Config {
                            source_name: "distributed job".into(),
                            message: why,
                        });
                    }
                    stream
                        .set_read_timeout(Some(self.timeout))
                        .map_err(io("accept"))?;
                    joined.insert(hello.rank);
                    self.peers[hello.rank] = Some(stream);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        let missing: Vec<String> = (1..env.world)
                            .filter(|r| !joined.contains(r))
                            .map(|r| r.to_string())
                            .collect();
                        let refusal = Welcome {
                            error: Some(format!("rank(s) {} never joined", missing.join(", "))),
                            nccl_id: None,
                        };
                        for s in self.peers.iter_mut().flatten() {
                            let _ = write_json(s, WELCOME, &refusal);
                        }
                        return Err(TrainError::Distributed(format!(
                            "rank(s) {} did not join within {} s (started? reaching {}:{}?)",
                            missing.join(", "),
                            opts.join_timeout.as_secs(),
                            env.master_addr,
                            env.master_port
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(TrainError::Distributed(format!(
                        "rank 0 accepting connections: {e}"
                    )))
                }
            }
        }
        self.nccl_id = nccl_id.clone();
        let welcome = Welcome {
            error: None,
            nccl_id,
        };
        for r in 1..env.world {
            let s = self.peers[r].as_mut().expect("joined");
            write_json(s, WELCOME, &welcome)
                .map_err(|e| link_error(&e, r, "rendezvous", self.timeout))?;
        }
        Ok(())
    }

    fn knock(&mut self, env: &RankEnv, identity: &JobIdentity, opts: &TcpOptions) -> Result<()> {
        let deadline = Instant::now() + opts.join_timeout;
        let target = format!("{}:{}", env.master_addr, env.master_port);
        let mut stream = loop {
            let attempt = target
                .to_socket_addrs()
                .map_err(|e| TrainError::Distributed(format!("MASTER_ADDR {target}: {e}")))?
                .find_map(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).ok());
            if let Some(s) = attempt {
                break s;
            }
            if Instant::now() > deadline {
                return Err(TrainError::Distributed(format!(
                    "rank {} could not reach rank 0 at {target} within {} s",
                    env.rank,
                    opts.join_timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        self.configure(&stream)?;
        stream
            .set_read_timeout(Some(opts.join_timeout))
            .map_err(io("connect"))?;
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "this host".into());
        let hello = Hello {
            rank: env.rank,
            world: env.world,
            host,
            identity: identity.clone(),
        };
        write_json(&mut stream, HELLO, &hello)
            .map_err(|e| link_error(&e, 0, "rendezvous", opts.join_timeout))?;
        let (kind, body) = read_frame(&mut stream)
            .map_err(|e| link_error(&e, 0, "rendezvous", opts.join_timeout))?;
        let welcome: Welcome = serde_json::from_slice(&body)
            .ok()
            .filter(|_| kind == WELCOME)
            .ok_or_else(|| {
                TrainError::Distributed(format!("{target} did not answer as ferrotune's rank 0"))
            })?;
        if let Some(why) = welcome.error {
            return Err(TrainError::Config {
                source_name: "distributed job".into(),
                message: why,
            });
        }
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(io("connect"))?;
        self.nccl_id = welcome.nccl_id;
        self.peers[0] = Some(stream);
        Ok(())
    }

    fn configure(&self, s: &TcpStream) -> Result<()> {
        s.set_nodelay(true).map_err(io("socket"))?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(io("socket"))?;
        Ok(())
    }

    fn stream(&mut self, r: usize) -> &mut TcpStream {
        self.peers[r]
            .as_mut()
            .expect("a stream to every peer rank 0 talks to")
    }

    fn send(&mut self, r: usize, bytes: &[u8], op: &str) -> Result<()> {
        let t = self.timeout;
        write_frame(self.stream(r), DATA, bytes).map_err(|e| link_error(&e, r, op, t))
    }

    fn recv(&mut self, r: usize, op: &str) -> Result<Vec<u8>> {
        let t = self.timeout;
        let (kind, body) = read_frame(self.stream(r)).map_err(|e| link_error(&e, r, op, t))?;
        if kind != DATA {
            return Err(TrainError::Distributed(format!(
                "rank {r} sent an unexpected message during {op}"
            )));
        }
        Ok(body)
    }

    /// Sums `buf` over ranks into every rank's `buf` (rank 0 adds in rank order).
    fn sum_f32(&mut self, buf: &mut [f32], op: &str) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            for r in 1..self.world {
                let other = self.recv(r, op)?;
                check_len(other.len(), buf.len() * 4, r, op)?;
                for (x, c) in buf.iter_mut().zip(other.chunks_exact(4)) {
                    *x += f32::from_le_bytes(c.try_into().expect("4 bytes"));
                }
            }
            let bytes = f32_bytes(buf);
            for r in 1..self.world {
                self.send(r, &bytes, op)?;
            }
        } else {
            self.send(0, &f32_bytes(buf), op)?;
            let total = self.recv(0, op)?;
            check_len(total.len(), buf.len() * 4, 0, op)?;
            read_f32(&total, buf);
        }
        Ok(())
    }
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> TrainError {
    move |e| TrainError::Distributed(format!("{what}: {e}"))
}

fn link_error(e: &std::io::Error, peer: usize, op: &str, timeout: Duration) -> TrainError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => TrainError::Distributed(format!(
            "rank {peer} did not answer within {} s during {op}: it died, hangs, or is slower than --dist-timeout",
            timeout.as_secs()
        )),
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => {
            TrainError::Distributed(format!(
                "rank {peer} is gone (its connection closed during {op}); its own log says why, this rank stops too"
            ))
        }
        _ => TrainError::Distributed(format!("talking to rank {peer} during {op}: {e}")),
    }
}

fn check_len(got: usize, want: usize, r: usize, op: &str) -> Result<()> {
    if got != want {
        return Err(TrainError::Distributed(format!(
            "rank {r} sent {got} bytes during {op}, this rank expected {want}: the ranks disagree about the model or adapter"
        )));
    }
    Ok(())
}

fn f32_bytes(buf: &[f32]) -> Vec<u8> {
    buf.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn read_f32(bytes: &[u8], buf: &mut [f32]) {
    for (x, c) in buf.iter_mut().zip(bytes.chunks_exact(4)) {
        *x = f32::from_le_bytes(c.try_into().expect("4 bytes"));
    }
}

fn write_frame(s: &mut TcpStream, kind: u32, body: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&kind.to_le_bytes());
    head[4..].copy_from_slice(&(body.len() as u64).to_le_bytes());
    s.write_all(&head)?;
    s.write_all(body)?;
    s.flush()
}

fn read_frame(s: &mut TcpStream) -> std::io::Result<(u32, Vec<u8>)> {
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    let kind = u32::from_le_bytes(head[..4].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(head[4..].try_into().expect("8 bytes"));
    if len > 1 << 36 {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("a frame of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok((kind, body))
}

fn write_json<T: Serialize>(s: &mut TcpStream, kind: u32, value: &T) -> std::io::Result<()> {
    write_frame(s, kind, &serde_json::to_vec(value).expect("serialisable"))
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, tensors: &mut [Tensor]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let mut flat = flatten(tensors)?;
        self.sum_f32(&mut flat, "a gradient all-reduce")?;
        unflatten(&flat, tensors)
    }

    fn all_reduce_scalars(&mut self, values: &mut [f64]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "a scalar all-reduce";
        if self.rank == 0 {
            for r in 1..self.world {
                let other = self.recv(r, op)?;
                check_len(other.len(), values.len() * 8, r, op)?;
                for (x, c) in values.iter_mut().zip(other.chunks_exact(8)) {
                    *x += f64::from_le_bytes(c.try_into().expect("8 bytes"));
                }
            }
            let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            for r in 1..self.world {
                self.send(r, &bytes, op)?;
            }
        } else {
            let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
            self.send(0, &bytes, op)?;
            let total = self.recv(0, op)?;
            check_len(total.len(), values.len() * 8, 0, op)?;
            for (x, c) in values.iter_mut().zip(total.chunks_exact(8)) {
                *x = f64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        Ok(())
    }

    fn ordered_sum(
        &mut self,
        acc: Option<Vec<Tensor>>,
        parts: Vec<Vec<Tensor>>,
        like: &[Tensor],
        owners: Option<&[usize]>,
    ) -> Result<Vec<Tensor>> {
        let op = "a gradient reduction";
        if self.world == 1 {
            return Solo.ordered_sum(acc, parts, like, owners);
        }
        let spans = spans(like);
        let total: usize = spans.last().map_or(0, |s| s.1);
        let mut result: Vec<Tensor> = like.to_vec();
        if self.rank == 0 {
            // The running sum travels 0 → 1 → 0 → 2 → …, each rank adding its parts in order.
            let mut acc = Solo.ordered_sum(acc, parts, like, None)?;
            for r in 1..self.world {
                self.send(r, &f32_bytes(&flatten(&acc)?), op)?;
                let back = self.recv(r, op)?;
                check_len(back.len(), total * 4, r, op)?;
                let mut flat = vec![0f32; total];
                read_f32(&back, &mut flat);
                unflatten(&flat, &mut acc)?;
            }
            let flat = flatten(&acc)?;
            for r in 1..self.world {
                let bytes: Vec<u8> = match owners {
                    None => f32_bytes(&flat),
                    Some(o) => spans
                        .iter()
                        .zip(o)
                        .filter(|(_, &x)| x == r)
                        .flat_map(|((a, b), _)| f32_bytes(&flat[*a..*b]))
                        .collect(),
                };
                self.send(r, &bytes, op)?;
            }
            result = acc;
        } else {
            let incoming = self.recv(0, op)?;
            check_len(incoming.len(), total * 4, 0, op)?;
            let mut flat = vec![0f32; total];
            read_f32(&incoming, &mut flat);
            let mut acc = like.to_vec();
            unflatten(&flat, &mut acc)?;
            let acc = super::fold_all(Some(acc), parts)?.expect("started from rank 0's sum");
            self.send(0, &f32_bytes(&flatten(&acc)?), op)?;
            let fin = self.recv(0, op)?;
            let mut flat = flatten(&result)?;
            match owners {
                None => {
                    check_len(fin.len(), total * 4, 0, op)?;
                    read_f32(&fin, &mut flat);
                }
                Some(o) => {
                    let mut at = 0;
                    for ((a, b), &x) in spans.iter().zip(o) {
                        if x == self.rank {
                            check_len(
                                fin.len().saturating_sub(at).min((b - a) * 4),
                                (b - a) * 4,
                                0,
                                op,
                            )?;
                            read_f32(&fin[at..at + (b - a) * 4], &mut flat[*a..*b]);
                            at += (b - a) * 4;
                        }
                    }
                }
            }
            unflatten(&flat, &mut result)?;
        }
        Ok(result)
    }

    fn broadcast_from_owners(&mut self, tensors: &mut [Tensor], owners: &[usize]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "a weight all-gather";
        let spans = spans(tensors);
        let mut flat = flatten(tensors)?;
        let owned_bytes = |flat: &[f32], r: usize| -> Vec<u8> {
            spans
                .iter()
                .zip(owners)
                .filter(|(_, &o)| o == r)
                .flat_map(|((a, b), _)| f32_bytes(&flat[*a..*b]))
                .collect()
        };
        let place = |flat: &mut [f32], r: usize, bytes: &[u8]| {
            let mut at = 0;
            for ((a, b), &o) in spans.iter().zip(owners) {
                if o == r {
                    read_f32(&bytes[at..at + (b - a) * 4], &mut flat[*a..*b]);
                    at += (b - a) * 4;
                }
            }
        };
        if self.rank == 0 {
            for r in 1..self.world {
                let bytes = self.recv(r, op)?;
                check_len(bytes.len(), owned_bytes(&flat, r).len(), r, op)?;
                place(&mut flat, r, &bytes);
            }
            let all = f32_bytes(&flat);
            for r in 1..self.world {
                self.send(r, &all, op)?;
            }
        } else {
            let mine = owned_bytes(&flat, self.rank);
            self.send(0, &mine, op)?;
            let all = self.recv(0, op)?;
            check_len(all.len(), flat.len() * 4, 0, op)?;
            read_f32(&all, &mut flat);
        }
        unflatten(&flat, tensors)
    }

    fn gather_to_root(&mut self, tensors: &mut [Tensor], owners: &[usize]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let op = "gathering optimizer state";
        let spans = spans(tensors);
        let mut flat = flatten(tensors)?;
        if self.rank == 0 {
            for r in 1..self.world {
                let bytes = self.recv(r, op)?;
                let mut at = 0;
                for ((a, b), &o) in spans.iter().zip(owners) {
                    if o == r {
                        check_len(
                            bytes.len().saturating_sub(at).min((b - a) * 4),
                            (b - a) * 4,
                            r,
                            op,
                        )?;
                        read_f32(&bytes[at..at + (b - a) * 4], &mut flat[*a..*b]);
                        at += (b - a) * 4;
                    }
                }
            }
            unflatten(&flat, tensors)?;
        } else {
            let mine: Vec<u8> = spans
                .iter()
                .zip(owners)
                .filter(|(_, &o)| o == self.rank)
                .flat_map(|((a, b), _)| f32_bytes(&flat[*a..*b]))
                .collect();
            self.send(0, &mine, op)?;
        }
        Ok(())
    }

    fn barrier(&mut self, timeout: Duration) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let normal = self.timeout;
        self.timeout = timeout;
        for s in self.peers.iter().flatten() {
            s.set_read_timeout(Some(timeout)).map_err(io("barrier"))?;
        }
        let outcome = self.all_reduce_scalars(&mut [0.0]);
        self.timeout = normal;
        for s in self.peers.iter().flatten() {
            s.set_read_timeout(Some(normal)).map_err(io("barrier"))?;
        }
        outcome
    }
}

/// `[start, end)` of each tensor in the flattened buffer.
fn spans(tensors: &[Tensor]) -> Vec<(usize, usize)> {
    let mut at = 0;
    tensors
        .iter()
        .map(|t| {
            let s = (at, at + t.elem_count());
            at = s.1;
            s
        })
        .collect()
}
