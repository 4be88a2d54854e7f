//! `kvs sim`: runs the deterministic simulation (`crate::sim`) over a range of seeds,
//! or its self-test (planted bugs the checker must catch), and prints what it found.

use std::process::ExitCode;

use clap::Args;

/// The arguments of `kvs sim`.
#[derive(Args, Clone)]
pub struct SimArgs {
    /// First seed to run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// How many consecutive seeds to run, from --seed.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Replicas per partition (K, at least 2).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(2..=9))]
    pub replicas: u64,
    /// Members of the first view (floor(nodes / K) partitions, the rest proxies); 0
    /// draws it per seed, from K to 2K + 1.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=40))]
    pub nodes: u64,
    /// Shard-count mode (seed 002's layout) with this many shards, whose changes add a
    /// node to a shard, move one, reshard, remove or replace; 0 is K mode.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=8))]
    pub shards: u64,
    /// Keep the first view: no nodes added, removed or replaced.
    #[arg(long)]
    pub no_view_changes: bool,
    /// Simulated milliseconds between two view changes: drawn from MIN..=MAX.
    #[arg(long, default_value = "4000,12000", value_parser = parse_gap)]
    pub change_gap_ms: (u64, u64),
    /// Concurrent client sessions.
    #[arg(long, default_value_t = 4)]
    pub clients: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// Simulated milliseconds of faults and load per seed.
    #[arg(long, default_value_t = 30_000)]
    pub duration_ms: u64,
    /// Print every event of each run (use with one seed).
    #[arg(long)]
    pub trace: bool,
    /// Only check the checker: plant known bugs and show which seed catches each.
    #[arg(long)]
    pub self_test: bool,
}

/// `MIN,MAX` milliseconds, `MIN <= MAX`.
fn parse_gap(text: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = text
        .split_once(',')
        .ok_or_else(|| format!("expected MIN,MAX, got {text:?}"))?;
    let parse = |t: &str| t.trim().parse::<u64>().map_err(|e| format!("{t:?}: {e}"));
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo == 0 || lo > hi {
        return Err(format!("need 0 < MIN <= MAX, got {lo},{hi}"));
    }
    Ok((lo, hi))
}

/// `kvs sim`: runs the seeds, prints one line per failing seed (every seed with
/// --trace) and the totals; fails if any seed found a problem.
pub fn run(args: &SimArgs) -> ExitCode {
    if args.self_test {
        let mut missed = false;
        for (bug, caught) in crate::sim::self_test(args.seeds.max(10)) {
            match caught {
                Some(seed) => println!("planted {bug:?}: caught by seed {seed}"),
                None => {
                    println!("planted {bug:?}: MISSED");
                    missed = true;
                }
            }
        }
        return if missed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        };
    }
    let mut failed = Vec::new();
    let mut convergence: Vec<u64> = Vec::new();
    let (mut ops, mut faults, mut transfers, mut interrupted) = (0, 0, 0, 0);
    let (mut changes, mut handed_over) = (0, 0);
    for seed in args.seed..args.seed.saturating_add(args.seeds) {
        let cfg = crate::sim::Config {
            seed,
            replicas: args.replicas as usize,
            nodes: args.nodes as usize,
            shards: args.shards as usize,
            view_changes: !args.no_view_changes,
            change_gap_ms: args.change_gap_ms,
            clients: args.clients,
            keys: args.keys as usize,
            duration_ms: args.duration_ms,
            trace: args.trace,
            bug: None,
        };
        let report = crate::sim::run(&cfg);
        for line in &report.trace {
            println!("{line}");
        }
        if args.trace || !report.ok() {
            println!("{}", crate::sim::summary(&report));
        }
        for f in &report.failures {
            println!("  {f}");
        }
        ops += report.writes + report.deletes + report.reads;
        faults += report.faults.len();
        transfers += report.transfers;
        changes += report.completed;
        handed_over += report.handed_over;
        interrupted += report.interrupted;
        convergence.extend(&report.convergence_ms);
        if !report.ok() {
            failed.push(seed);
        }
    }
    convergence.sort_unstable();
    let pct = |p: usize| {
        convergence
            .get((convergence.len() * p / 100).min(convergence.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{} seeds from {}: {ops} client operations, {faults} faults, {changes} view changes ({handed_over} keys handed over), {transfers} state transfers; \
         convergence after {} heals (simulated ms): p50 {} p99 {} max {} ({interrupted} heals cut short by the next fault)",
        args.seeds,
        args.seed,
        convergence.len(),
        pct(50),
        pct(99),
        convergence.last().copied().unwrap_or(0),
    );
    if failed.is_empty() {
        println!("no lost writes, no causal anomalies, no divergence");
        ExitCode::SUCCESS
    } else {
        println!(
            "FAILED seeds: {failed:?}; replay one with: kvs sim --seed {} --trace",
            failed[0]
        );
        ExitCode::FAILURE
    }
}
