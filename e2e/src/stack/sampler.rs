//! Watching instances come and go: the [`Sampler`] (processes from `/proc`, or pods from the
//! API) behind the beat scenarios' "never two schedulers" checks, and the `/proc` helpers.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

use super::Stack;

impl Stack {
    /// Samples, until [`Sampler::finish`], how many beat SCHEDULERS of `pool` run. With the pod
    /// runner: processes of the pool's beat pods (argv has `beat` and a path under the pods'
    /// directory) that hold the beat schedule file (`celerybeat-schedule*` in that pod's
    /// directory) open, from `/proc` every 5 ms. A beat runs its scheduler exactly while it holds
    /// the schedule open (the worker image's entrypoint keeps it open from `beat_init` until the
    /// scheduler has stopped, whatever dbm backend the shelve uses; a scheduler without a schedule
    /// file, such as RedBeat, the default on the stack's Redis, holds the entrypoint's empty
    /// `celerybeat-schedule.running` marker open instead); a beat entrypoint waiting for the beat
    /// lock has none open and is not counted. On a real cluster: Ready beat pods (beat is
    /// ready from `beat_init` on), listed every 50 ms. [`Stack::sample_beat_processes`] counts
    /// every beat process instead.
    pub fn sample_beat(&self, pool: &str) -> Sampler {
        match self.runner() {
            Some(runner) => {
                let pods_dir = format!("{}/{}/{pool}-beat-", runner.pods_dir().display(), self.namespace);
                Sampler::processes_where(Duration::from_millis(5), move |pid, argv| {
                    is_beat_argv(argv, &pods_dir)
                        && open_files(pid).iter().any(|f| {
                            f.to_str().is_some_and(|p| p.starts_with(&pods_dir))
                                && f.file_name()
                                    .and_then(|n| n.to_str())
                                    .is_some_and(|n| n.starts_with("celerybeat-schedule"))
                        })
                })
            }
            None => Sampler::ready_pods(Api::namespaced(self.client.clone(), &self.namespace), beat_selector(pool)),
        }
    }

    /// Samples every beat PROCESS of `pool`, scheduling or waiting for the beat lock: with the pod
    /// runner, processes whose argv has `beat` and a path under the pool's beat pods' directory
    /// (every 25 ms); on a real cluster, beat pods with a running container (every 50 ms).
    pub fn sample_beat_processes(&self, pool: &str) -> Sampler {
        match self.runner() {
            Some(runner) => {
                let pods_dir = format!("{}/{}/{pool}-beat-", runner.pods_dir().display(), self.namespace);
                // Coarser than the schedulers' sampler: two /proc scans every 5 ms cost a 2-core
                // machine running scenarios in parallel more than this context is worth.
                Sampler::processes(Duration::from_millis(25), move |argv| is_beat_argv(argv, &pods_dir))
            }
            None => Sampler::pods(Api::namespaced(self.client.clone(), &self.namespace), beat_selector(pool)),
        }
    }
}

/// What a [`Sampler`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SampleReport {
    /// Samples taken.
    pub samples: u64,
    /// The most instances alive in one sample.
    pub max_simultaneous: usize,
    /// Instances alive in the last sample.
    pub last: usize,
    /// Every distinct instance seen (pids, or pod names on a cluster).
    pub distinct: BTreeSet<String>,
    /// Each change of the alive set: (time since start, instances alive).
    pub changes: Vec<(Duration, Vec<String>)>,
    /// The longest time between two samples (what a shorter-lived instance could slip through).
    pub max_gap: Duration,
    last_at: Duration,
}

impl SampleReport {
    /// The most instances alive at once from `since` (a [`Sampler::elapsed`] mark) on, counting
    /// the set that was alive at that moment.
    pub fn max_simultaneous_since(&self, since: Duration) -> usize {
        let first = self.changes.iter().rposition(|(at, _)| *at <= since).unwrap_or(0);
        self.changes[first..].iter().map(|(_, alive)| alive.len()).max().unwrap_or(0)
    }

    fn record(&mut self, start: Instant, alive: Vec<String>) {
        let now = start.elapsed();
        if self.samples > 0 {
            self.max_gap = self.max_gap.max(now - self.last_at);
        }
        self.last_at = now;
        self.samples += 1;
        self.max_simultaneous = self.max_simultaneous.max(alive.len());
        self.last = alive.len();
        if self.changes.last().is_none_or(|(_, prev)| *prev != alive) {
            self.distinct.extend(alive.iter().cloned());
            self.changes.push((now, alive));
        }
    }
}

/// Samples a set of live instances in the background until [`Sampler::finish`].
pub struct Sampler {
    started: Instant,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<SampleReport>>,
    task: Option<SamplerTask>,
}

enum SamplerTask {
    Thread(std::thread::JoinHandle<()>),
    Task(tokio::task::JoinHandle<()>),
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").field("report", &self.report()).finish_non_exhaustive()
    }
}

impl Sampler {
    /// Scans `/proc` every `every` for processes (not zombies) whose argv satisfies `matches`.
    pub fn processes(every: Duration, matches: impl Fn(&[String]) -> bool + Send + 'static) -> Sampler {
        Sampler::processes_where(every, move |_, argv| matches(argv))
    }

    /// Scans `/proc` every `every` for processes (not zombies) for which `matches(pid, argv)`
    /// holds (e.g. with [`open_files`]).
    pub fn processes_where(every: Duration, matches: impl Fn(u32, &[String]) -> bool + Send + 'static) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(SampleReport::default()));
        let (stop2, report2) = (stop.clone(), report.clone());
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            let start = started;
            while !stop2.load(Ordering::Relaxed) {
                let alive = matching_processes_where(&matches).into_iter().map(|p| p.to_string()).collect();
                report2.lock().expect("report lock").record(start, alive);
                std::thread::sleep(every);
            }
        });
        Sampler { started, stop, report, task: Some(SamplerTask::Thread(thread)) }
    }

    /// Lists pods matching `selector` every 50 ms and counts those with a running container.
    pub fn pods(api: Api<Pod>, selector: String) -> Sampler {
        Sampler::pods_where(api, selector, |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some())))
        })
    }

    /// Lists pods matching `selector` every 50 ms and counts those with condition `Ready=True`.
    pub fn ready_pods(api: Api<Pod>, selector: String) -> Sampler {
        Sampler::pods_where(api, selector, |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
    }

    fn pods_where(api: Api<Pod>, selector: String, counts: fn(&Pod) -> bool) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(SampleReport::default()));
        let (stop2, report2) = (stop.clone(), report.clone());
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let start = started;
            while !stop2.load(Ordering::Relaxed) {
                if let Ok(list) = api.list(&ListParams::default().labels(&selector)).await {
                    let alive =
                        list.items.iter().filter(|p| counts(p)).filter_map(|p| p.metadata.name.clone()).collect();
                    report2.lock().expect("report lock").record(start, alive);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Sampler { started, stop, report, task: Some(SamplerTask::Task(task)) }
    }

    /// Time since sampling started: a mark for [`SampleReport::max_simultaneous_since`].
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// What was seen so far.
    pub fn report(&self) -> SampleReport {
        self.report.lock().expect("report lock").clone()
    }

    /// Stops sampling and returns everything seen.
    pub async fn finish(mut self) -> SampleReport {
        self.stop.store(true, Ordering::Relaxed);
        match self.task.take() {
            Some(SamplerTask::Thread(t)) => {
                let _ = tokio::task::spawn_blocking(move || t.join()).await;
            }
            Some(SamplerTask::Task(t)) => {
                let _ = t.await;
            }
            None => {}
        }
        self.report.lock().expect("report lock").clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Pids of live (non-zombie) processes whose argv satisfies `matches`.
pub fn matching_processes(matches: &dyn Fn(&[String]) -> bool) -> Vec<u32> {
    matching_processes_where(&|_, argv| matches(argv))
}

/// Pids of live (non-zombie) processes for which `matches(pid, argv)` holds.
pub fn matching_processes_where(matches: &dyn Fn(u32, &[String]) -> bool) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
            let argv: Vec<String> =
                raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into()).collect();
            !argv.is_empty() && matches(*pid, &argv) && !is_zombie(*pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The files a live process has open (the targets of `/proc/<pid>/fd/*`; sockets and pipes show
/// as `socket:[..]`/`pipe:[..]`); empty when it is gone or not ours to inspect.
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    entries.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok()).collect()
}

/// A beat container's argv in the runner: `beat` and a path under `pods_dir` (the schedule).
fn is_beat_argv(argv: &[String], pods_dir: &str) -> bool {
    argv.iter().any(|a| a == "beat") && argv.iter().any(|a| a.starts_with(pods_dir))
}

fn beat_selector(pool: &str) -> String {
    format!("app.kubernetes.io/instance={pool},app.kubernetes.io/component=beat,app.kubernetes.io/name=celery")
}

/// Whether a process is gone or a zombie.
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// Whether a process is alive (exists and is not a zombie).
pub fn is_alive(pid: u32) -> bool {
    !is_zombie(pid)
}

/// The process group of a live process.
pub fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command: state ppid pgrp ...
    stat.rsplit_once(") ")?.1.split_whitespace().nth(2)?.parse().ok()
}

/// Live processes in any of the given process groups.
pub fn processes_in_groups(groups: &[u32]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| process_group(*pid).is_some_and(|g| groups.contains(&g)) && is_alive(*pid))
        .collect()
}

/// The environment of a live process (`/proc/<pid>/environ`).
pub fn process_env(pid: u32) -> HashMap<String, String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_helpers_see_this_process() {
        let me = std::process::id();
        assert!(is_alive(me));
        assert!(process_group(me).is_some());
        assert!(process_env(me).contains_key("PATH") || std::env::var_os("PATH").is_none());
    }

    #[test]
    fn open_files_show_a_file_this_process_holds_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("celerybeat-schedule.dat");
        let me = std::process::id();
        let holds = || open_files(me).iter().any(|f| f == &path);
        std::fs::write(&path, b"").unwrap();
        assert!(!holds());
        let file = std::fs::File::open(&path).unwrap();
        assert!(holds());
        drop(file);
        assert!(!holds());
        let pods_dir = dir.path().to_str().unwrap();
        assert!(is_beat_argv(&["python".into(), "beat".into(), format!("{pods_dir}/s")], pods_dir));
        assert!(!is_beat_argv(&["python".into(), "worker".into(), format!("{pods_dir}/s")], pods_dir));
    }
}
