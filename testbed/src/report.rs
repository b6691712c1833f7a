//! The side-by-side benchmark's report: raw samples in, Markdown tables (median, spread,
//! ratios) and an SVG chart out. Pure functions, so what the report says is tested apart from
//! the run that measured it.
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// A way of reaching the Service's backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Mode {
    /// The client talks to backend pod addresses: no load balancer at all (the floor).
    Direct,
    /// The client talks to the Service address through sluice's TC programs.
    Sluice,
    /// The client's process is in a cgroup with sluice's socket programs: its connect() and
    /// sendmsg() go to a backend, and the packets are plain pod-to-pod traffic that the TC
    /// programs pass.
    SluiceSocket,
    /// sluice's TC programs, and its XDP program on the node's uplink in native mode: a
    /// packet of an established flow from outside is DNATed before the skb is built.
    SluiceXdp,
    /// kube-proxy's iptables mode (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-* rules) on the legacy
    /// x_tables backend (`iptables-legacy-restore`).
    IptablesLegacy,
    /// The same rules through the nf_tables backend (`iptables-nft-restore`), what
    /// `iptables` is on current Debian, Ubuntu and RHEL hosts.
    IptablesNft,
    /// kube-proxy's nftables mode: the service-ips verdict map and per-service chains.
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 7] = [
        Mode::Direct,
        Mode::Sluice,
        Mode::SluiceSocket,
        Mode::SluiceXdp,
        Mode::IptablesLegacy,
        Mode::IptablesNft,
        Mode::Nftables,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Sluice => "sluice",
            Mode::SluiceSocket => "sluice-socket",
            Mode::SluiceXdp => "sluice-xdp",
            Mode::IptablesLegacy => "iptables-legacy",
            Mode::IptablesNft => "iptables-nft",
            Mode::Nftables => "nftables",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Mode::Direct => "#777777",
            Mode::Sluice => "#1f77b4",
            Mode::SluiceSocket => "#9467bd",
            Mode::SluiceXdp => "#17becf",
            Mode::IptablesLegacy => "#d62728",
            Mode::IptablesNft => "#ff7f0e",
            Mode::Nftables => "#2ca02c",
        }
    }
}

/// What one cell measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// New connections (one request each) per second.
    NewConnRate,
    NewConnP50,
    NewConnP99,
    /// Requests per second on persistent connections.
    PersistentRate,
    PersistentP99,
    /// UDP requests per second.
    UdpRate,
    /// Time to program every Service from empty.
    ProgramAll,
    /// Time for one endpoint change to take effect, every Service present.
    EndpointChange,
    /// sluice's programs during the new-connection load: mean ns per program run (the
    /// kernel's own run-time statistics).
    ProgramNsPerRun,
    /// sluice's programs during the new-connection load: program runs per connection.
    ProgramRunsPerConn,
    /// sluice's programs during the new-connection load: µs of program time per connection.
    ProgramUsPerConn,
    /// UDP packets per second delivered to the backends from a sender that never waits (an
    /// `AF_PACKET` socket), the NodePort sections only.
    PacketRate,
    /// CPU time of the whole machine (sender included) per million packets delivered, during
    /// the packet rate, in ms.
    CpuPerMpkt,
    /// sluice's programs during the packet rate: ns of program time per packet delivered (the
    /// runs for its echo included), beside the whole machine's CPU per packet.
    ProgramNsPerPkt,
}

impl Metric {
    pub const ALL: [Metric; 14] = [
        Metric::NewConnRate,
        Metric::NewConnP50,
        Metric::NewConnP99,
        Metric::PersistentRate,
        Metric::PersistentP99,
        Metric::UdpRate,
        Metric::ProgramAll,
        Metric::EndpointChange,
        Metric::ProgramNsPerRun,
        Metric::ProgramRunsPerConn,
        Metric::ProgramUsPerConn,
        Metric::PacketRate,
        Metric::CpuPerMpkt,
        Metric::ProgramNsPerPkt,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Metric::NewConnRate => "New connections per second (one request each)",
            Metric::NewConnP50 => "New connection latency, p50 (connect to close)",
            Metric::NewConnP99 => "New connection latency, p99",
            Metric::PersistentRate => "Requests per second on persistent connections",
            Metric::PersistentP99 => "Persistent-connection request latency, p99",
            Metric::UdpRate => "UDP requests per second",
            Metric::ProgramAll => "Time to program all Services from empty",
            Metric::EndpointChange => "Time for one endpoint change to take effect",
            Metric::ProgramNsPerRun => {
                "sluice's programs under the new-connection load: time per run"
            }
            Metric::ProgramRunsPerConn => {
                "sluice's programs under the new-connection load: runs per connection"
            }
            Metric::ProgramUsPerConn => {
                "sluice's programs under the new-connection load: time per connection"
            }
            Metric::PacketRate => "UDP packets per second delivered, from an AF_PACKET sender",
            Metric::CpuPerMpkt => {
                "CPU time per million packets delivered (the whole machine, sender included)"
            }
            Metric::ProgramNsPerPkt => {
                "sluice's programs under the packet rate: time per packet delivered (its echo's runs included)"
            }
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::NewConnRate | Metric::PersistentRate | Metric::UdpRate | Metric::PacketRate => {
                "/s"
            }
            Metric::NewConnP50
            | Metric::NewConnP99
            | Metric::PersistentP99
            | Metric::ProgramUsPerConn => "µs",
            Metric::ProgramNsPerRun | Metric::ProgramNsPerPkt => "ns",
            Metric::ProgramRunsPerConn => "runs",
            Metric::ProgramAll | Metric::EndpointChange | Metric::CpuPerMpkt => "ms",
        }
    }

    /// Whether a larger value is better (rates) or worse (times).
    pub fn higher_is_better(self) -> bool {
        matches!(
            self,
            Metric::NewConnRate | Metric::PersistentRate | Metric::UdpRate | Metric::PacketRate
        )
    }

    /// Whether `mode` has this measure: the direct path programs nothing, and the program
    /// statistics are sluice's own.
    fn applies_to(self, mode: Mode) -> bool {
        match self {
            Metric::ProgramAll | Metric::EndpointChange => mode != Mode::Direct,
            Metric::ProgramNsPerRun
            | Metric::ProgramRunsPerConn
            | Metric::ProgramUsPerConn
            | Metric::ProgramNsPerPkt => {
                matches!(mode, Mode::Sluice | Mode::SluiceSocket | Mode::SluiceXdp)
            }
            _ => true,
        }
    }
}

/// One measured value of one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub mode: Mode,
    pub services: u32,
    pub round: u32,
    pub metric: Metric,
    pub value: f64,
}

/// Everything a run measured, and what it could not.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub samples: Vec<Sample>,
    /// Modes that could not run here, and why.
    pub unavailable: Vec<(Mode, String)>,
    /// Cells (mode, Service count) that ran fewer rounds than the others, or none, and why.
    pub skipped: Vec<(Mode, u32, String)>,
    /// Things the reader must know about this run (errors seen, for example).
    pub notes: Vec<String>,
}

impl Report {
    /// Whether the report has anything of `mode`: a sample, a skipped cell, or why it could not
    /// run.
    pub fn mentions(&self, mode: Mode) -> bool {
        self.samples.iter().any(|s| s.mode == mode)
            || self.skipped.iter().any(|(m, _, _)| *m == mode)
            || self.unavailable.iter().any(|(m, _)| *m == mode)
    }
}

/// Median and range of a cell's rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub rounds: usize,
}

/// The median (mean of the middle two for an even count) and range of `values`.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if !n.is_multiple_of(2) {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        rounds: n,
    })
}

impl Report {
    /// The summary of `metric` for `mode` at `services`.
    pub fn cell(&self, mode: Mode, services: u32, metric: Metric) -> Option<Summary> {
        let v: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.mode == mode && s.services == services && s.metric == metric)
            .map(|s| s.value)
            .collect();
        summarize(&v)
    }

    /// `a` over `b` for `metric` at `services`, round by round: the median and range of the
    /// ratios of the rounds both ran in. Each round runs every mode back to back, so a pair
    /// shares the machine's state of the moment, and a drift across rounds (another tenant's
    /// load, a warming cache) cancels instead of widening the ratio as medians of the modes
    /// taken apart would.
    pub fn paired_ratio(&self, a: Mode, b: Mode, services: u32, metric: Metric) -> Option<Summary> {
        let value = |mode: Mode, round: u32| {
            self.samples
                .iter()
                .find(|s| {
                    s.mode == mode
                        && s.services == services
                        && s.metric == metric
                        && s.round == round
                })
                .map(|s| s.value)
        };
        let mut rounds: Vec<u32> = self
            .samples
            .iter()
            .filter(|s| s.mode == a && s.services == services && s.metric == metric)
            .map(|s| s.round)
            .collect();
        rounds.sort_unstable();
        rounds.dedup();
        let ratios: Vec<f64> = rounds
            .into_iter()
            .filter_map(|r| match (value(a, r), value(b, r)) {
                (Some(x), Some(y)) if y != 0.0 => Some(x / y),
                _ => None,
            })
            .collect();
        summarize(&ratios)
    }

    /// Every Service count measured, ascending.
    pub fn sizes(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.samples.iter().map(|s| s.services).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The most rounds any cell has.
    pub fn max_rounds(&self) -> usize {
        let mut best = 0;
        for m in Mode::ALL {
            for n in self.sizes() {
                for metric in Metric::ALL {
                    best = best.max(self.cell(m, n, metric).map_or(0, |s| s.rounds));
                }
            }
        }
        best
    }

    fn why_unavailable(&self, mode: Mode) -> Option<&str> {
        self.unavailable
            .iter()
            .find(|(m, _)| *m == mode)
            .map(|(_, why)| why.as_str())
    }
}

/// A number with about three significant digits and thousands separators.
pub fn fmt_num(v: f64) -> String {
    if !v.is_finite() {
        return "n/a".into();
    }
    let a = v.abs();
    let decimals = if a >= 100.0 {
        0
    } else if a >= 10.0 {
        1
    } else {
        2
    };
    let s = format!("{v:.decimals$}");
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let grouped = group_thousands(digits);
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

/// A count with thousands separators.
pub fn fmt_count(n: u32) -> String {
    group_thousands(&n.to_string())
}

/// `digits` with a comma before every group of three from the right.
fn group_thousands(digits: &str) -> String {
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn fmt_cell(s: &Summary) -> String {
    format!(
        "{} ({}–{})",
        fmt_num(s.median),
        fmt_num(s.min),
        fmt_num(s.max)
    )
}

/// The Markdown tables: one per metric, rows by Service count, columns by mode (median and
/// min–max of the rounds), then sluice's ratio to each other mode, paired round by round
/// ([`Report::paired_ratio`]).
pub fn render_tables(report: &Report) -> String {
    let mut md = String::new();
    let sizes = report.sizes();
    for (mode, why) in &report.unavailable {
        let _ = writeln!(md, "- **{}** could not run here: {why}", mode.name());
    }
    for (mode, n, why) in &report.skipped {
        let _ = writeln!(
            md,
            "- **{}** at {} Services: {why}",
            mode.name(),
            fmt_count(*n)
        );
    }
    if !report.unavailable.is_empty() || !report.skipped.is_empty() {
        md.push('\n');
    }
    let max_rounds = report.max_rounds();
    for metric in Metric::ALL {
        // The packet rate is measured in the NodePort sections only: no table elsewhere.
        if matches!(
            metric,
            Metric::PacketRate | Metric::CpuPerMpkt | Metric::ProgramNsPerPkt
        ) && !report.samples.iter().any(|s| s.metric == metric)
        {
            continue;
        }
        // sluice-xdp has a column only in a section that ran it (or said why not): XDP is on
        // uplinks, and most sections' traffic never crosses one.
        let modes: Vec<Mode> = Mode::ALL
            .into_iter()
            .filter(|m| metric.applies_to(*m))
            .filter(|m| *m != Mode::SluiceXdp || report.mentions(*m))
            .collect();
        // sluice's TC path against every other way; its socket path against the floor (the
        // goal it has: the direct path's rate).
        let others: Vec<Mode> = modes
            .iter()
            .copied()
            .filter(|m| !matches!(m, Mode::Sluice | Mode::SluiceSocket | Mode::SluiceXdp))
            .collect();
        let socket_ratio = modes.contains(&Mode::SluiceSocket) && modes.contains(&Mode::Direct);
        // XDP in front of the same TC programs: against them.
        let xdp_ratio = modes.contains(&Mode::SluiceXdp)
            && modes.contains(&Mode::Sluice)
            && sizes
                .iter()
                .any(|&n| report.cell(Mode::SluiceXdp, n, metric).is_some());
        let better = if metric.higher_is_better() {
            "higher is better; a ratio above 1 favours sluice"
        } else {
            "lower is better; a ratio below 1 favours sluice"
        };
        let _ = writeln!(
            md,
            "### {} ({})\n\n{}Median of the rounds (min–max). Ratios: the median of the per-round ratios (each round runs every mode back to back), with their range when there are several.\n",
            metric.title(),
            metric.unit(),
            if others.is_empty() {
                String::new()
            } else {
                format!("{better}. ")
            }
        );
        md.push_str("| Services |");
        for m in &modes {
            let _ = write!(md, " {} |", m.name());
        }
        for m in &others {
            let _ = write!(md, " sluice/{} |", m.name());
        }
        if socket_ratio {
            md.push_str(" sluice-socket/direct |");
        }
        if xdp_ratio {
            md.push_str(" sluice-xdp/sluice |");
        }
        md.push_str("\n|---:|");
        for _ in 0..modes.len() + others.len() + usize::from(socket_ratio) + usize::from(xdp_ratio)
        {
            md.push_str("---:|");
        }
        md.push('\n');
        for &n in &sizes {
            let _ = write!(md, "| {} |", fmt_count(n));
            for &m in &modes {
                let cell = match (report.cell(m, n, metric), report.why_unavailable(m)) {
                    (Some(s), _) if s.rounds < max_rounds => {
                        format!("{} [{} of {max_rounds} rounds]", fmt_cell(&s), s.rounds)
                    }
                    (Some(s), _) => fmt_cell(&s),
                    (None, Some(_)) => "did not run".into(),
                    (None, None)
                        if report
                            .skipped
                            .iter()
                            .any(|(sm, sn, _)| *sm == m && *sn == n) =>
                    {
                        "skipped".into()
                    }
                    (None, None) => "—".into(),
                };
                let _ = write!(md, " {cell} |");
            }
            let ratio = |a: Mode, b: Mode| match report.paired_ratio(a, b, n, metric) {
                Some(r) if r.rounds > 1 => format!("{:.2} ({:.2}–{:.2})", r.median, r.min, r.max),
                Some(r) => format!("{:.2}", r.median),
                None => "—".into(),
            };
            for &m in &others {
                let _ = write!(md, " {} |", ratio(Mode::Sluice, m));
            }
            if socket_ratio {
                let _ = write!(md, " {} |", ratio(Mode::SluiceSocket, Mode::Direct));
            }
            if xdp_ratio {
                let _ = write!(md, " {} |", ratio(Mode::SluiceXdp, Mode::Sluice));
            }
            md.push('\n');
        }
        md.push('\n');
    }
    md
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG line chart of `metric` against the number of Services, one line per mode (the
/// median) with a bar for each cell's min–max. Service counts are evenly spaced categories.
pub fn chart_svg(report: &Report, metric: Metric, subtitle: &str) -> String {
    const W: f64 = 720.0;
    const H: f64 = 440.0;
    const L: f64 = 80.0;
    const R: f64 = 150.0;
    const T: f64 = 60.0;
    const B: f64 = 60.0;
    let sizes = report.sizes();
    let pw = W - L - R;
    let ph = H - T - B;
    let ymax = Mode::ALL
        .iter()
        .flat_map(|m| sizes.iter().filter_map(|&n| report.cell(*m, n, metric)))
        .map(|s| s.max)
        .fold(0.0_f64, f64::max);
    let ytop = nice_ceiling(ymax);
    let x = |i: usize| {
        if sizes.len() <= 1 {
            L + pw / 2.0
        } else {
            L + pw * (i as f64) / ((sizes.len() - 1) as f64)
        }
    };
    let y = |v: f64| T + ph - ph * (v / ytop);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="24" font-size="16" text-anchor="middle">{} ({})</text>"#,
        W / 2.0,
        esc(metric.title()),
        esc(metric.unit())
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="42" text-anchor="middle" fill="#555">{}</text>"##,
        W / 2.0,
        esc(subtitle)
    );
    // Axes, grid and ticks.
    for k in 0..=5 {
        let v = ytop * f64::from(k) / 5.0;
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            L + pw,
            L - 6.0,
            yy + 4.0,
            fmt_num(v)
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{L}" y1="{T}" x2="{L}" y2="{:.1}" stroke="black"/><line x1="{L}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
        T + ph,
        T + ph,
        L + pw,
        T + ph
    );
    for (i, n) in sizes.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            x(i),
            T + ph + 18.0,
            fmt_count(*n)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">Services (one carries the traffic; the rest have 3 endpoints each)</text>"#,
        L + pw / 2.0,
        H - 16.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        T + ph / 2.0,
        esc(metric.unit())
    );
    // One line per mode, with min–max bars.
    let mut legend = 0;
    for mode in Mode::ALL {
        let pts: Vec<(usize, Summary)> = sizes
            .iter()
            .enumerate()
            .filter_map(|(i, &n)| report.cell(mode, n, metric).map(|c| (i, c)))
            .collect();
        if pts.is_empty() {
            continue;
        }
        let c = mode.color();
        let path: Vec<String> = pts
            .iter()
            .map(|(i, c)| format!("{:.1},{:.1}", x(*i), y(c.median)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (i, cell) in &pts {
            let _ = writeln!(
                s,
                r#"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" stroke="{c}"/><circle cx="{0:.1}" cy="{3:.1}" r="3.5" fill="{c}"/>"#,
                x(*i),
                y(cell.min),
                y(cell.max),
                y(cell.median)
            );
        }
        let ly = T + 10.0 + 20.0 * f64::from(legend);
        let _ = writeln!(
            s,
            r#"<line x1="{0:.1}" y1="{ly:.1}" x2="{1:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="2"/><text x="{2:.1}" y="{3:.1}">{4}</text>"#,
            L + pw + 16.0,
            L + pw + 40.0,
            L + pw + 46.0,
            ly + 4.0,
            mode.name()
        );
        legend += 1;
    }
    s.push_str("</svg>\n");
    s
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten that is at least `v` (and positive).
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

/// The `p` quantile (0 to 1, nearest rank) of `v`, in milliseconds.
pub fn quantile_ms(v: &[std::time::Duration], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort();
    let Some(last) = v.len().checked_sub(1) else {
        return f64::NAN;
    };
    v[(last as f64 * p).round() as usize].as_secs_f64() * 1e3
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:`, `VmHWM:`); 0 if unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(mode: Mode, services: u32, round: u32, metric: Metric, value: f64) -> Sample {
        Sample {
            mode,
            services,
            round,
            metric,
            value,
        }
    }

    #[test]
    fn median_of_odd_and_even_counts_and_the_range() {
        let s = summarize(&[5.0, 1.0, 3.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.rounds), (3.0, 1.0, 5.0, 3));
        let s = summarize(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(summarize(&[]).is_none());
    }

    #[test]
    fn numbers_are_grouped_and_rounded_to_about_three_digits() {
        assert_eq!(fmt_num(12_345.6), "12,346");
        assert_eq!(fmt_num(1_000.0), "1,000");
        assert_eq!(fmt_num(999.0), "999");
        assert_eq!(fmt_num(42.25), "42.2");
        assert_eq!(fmt_num(1.234), "1.23");
        assert_eq!(fmt_num(-1_234_567.0), "-1,234,567");
        assert_eq!(fmt_num(f64::NAN), "n/a");
    }

    #[test]
    fn tables_show_median_range_and_sluice_ratios() {
        let mut r = Report::default();
        for (round, (d, s, k, i, n)) in [
            (100.0, 90.0, 98.0, 45.0, 60.0),
            (110.0, 95.0, 108.0, 50.0, 58.0),
            (90.0, 80.0, 88.0, 40.0, 62.0),
        ]
        .into_iter()
        .enumerate()
        {
            let round = round as u32;
            r.samples
                .push(sample(Mode::Direct, 1000, round, Metric::NewConnRate, d));
            r.samples
                .push(sample(Mode::Sluice, 1000, round, Metric::NewConnRate, s));
            r.samples.push(sample(
                Mode::SluiceSocket,
                1000,
                round,
                Metric::NewConnRate,
                k,
            ));
            r.samples.push(sample(
                Mode::IptablesLegacy,
                1000,
                round,
                Metric::NewConnRate,
                i,
            ));
            r.samples
                .push(sample(Mode::Nftables, 1000, round, Metric::NewConnRate, n));
        }
        let md = render_tables(&r);
        let row = md
            .lines()
            .find(|l| l.starts_with("| 1,000 |"))
            .expect("a row for 1,000 Services");
        // Per round, sluice/direct is 0.90, 0.86, 0.89; /iptables-legacy 2.00, 1.90, 2.00;
        // /nftables 1.50, 1.64, 1.29; iptables-nft has no samples; the socket path against
        // direct 0.98, 0.98, 0.98. (The medians' ratio for sluice/direct would be 0.90.)
        assert_eq!(
            row,
            "| 1,000 | 100 (90.0–110) | 90.0 (80.0–95.0) | 98.0 (88.0–108) | 45.0 (40.0–50.0) | — | 60.0 (58.0–62.0) | 0.89 (0.86–0.90) | 2.00 (1.90–2.00) | — | 1.50 (1.29–1.64) | 0.98 (0.98–0.98) |"
        );
        assert!(md.contains(" sluice/nftables | sluice-socket/direct |"));
        assert!(md.contains("higher is better"));
    }

    #[test]
    fn sluice_xdp_has_a_column_and_a_ratio_to_sluice_only_where_it_ran() {
        let mut r = Report::default();
        for (round, (s, x)) in [(100.0, 110.0), (90.0, 108.0)].into_iter().enumerate() {
            let round = round as u32;
            r.samples
                .push(sample(Mode::Sluice, 1, round, Metric::UdpRate, s));
            r.samples
                .push(sample(Mode::SluiceXdp, 1, round, Metric::UdpRate, x));
        }
        let md = render_tables(&r);
        assert!(md.contains(" sluice-xdp | iptables-legacy |"), "{md}");
        assert!(md.contains(" sluice-xdp/sluice |"), "{md}");
        // Per round 1.10 and 1.20.
        assert!(md.contains(" 1.15 (1.10–1.20) |"), "{md}");
        let without = Report {
            samples: r
                .samples
                .iter()
                .filter(|x| x.mode != Mode::SluiceXdp)
                .cloned()
                .collect(),
            ..Default::default()
        };
        assert!(!render_tables(&without).contains("sluice-xdp"));
    }

    #[test]
    fn ratios_pair_the_rounds_both_modes_ran_in() {
        let mut r = Report::default();
        // The machine slows down across rounds; the socket path stays 3% behind within each.
        for (round, direct) in [(0, 200.0), (1, 150.0), (2, 100.0)] {
            r.samples
                .push(sample(Mode::Direct, 1, round, Metric::NewConnRate, direct));
            r.samples.push(sample(
                Mode::SluiceSocket,
                1,
                round,
                Metric::NewConnRate,
                direct * 0.97,
            ));
        }
        // A round direct did not run in has nothing to pair with and is left out.
        r.samples
            .push(sample(Mode::SluiceSocket, 1, 3, Metric::NewConnRate, 1.0));
        let p = r
            .paired_ratio(Mode::SluiceSocket, Mode::Direct, 1, Metric::NewConnRate)
            .unwrap();
        assert_eq!(p.rounds, 3, "{p:?}");
        assert!(
            (p.median - 0.97).abs() < 1e-9 && (p.max - p.min) < 1e-9,
            "{p:?}"
        );
        assert!(
            r.paired_ratio(Mode::Sluice, Mode::Direct, 1, Metric::NewConnRate)
                .is_none(),
            "no sluice samples: no ratio"
        );
    }

    #[test]
    fn direct_has_no_control_plane_columns_and_missing_modes_say_why() {
        let mut r = Report::default();
        r.samples
            .push(sample(Mode::Sluice, 1, 0, Metric::ProgramAll, 2.0));
        r.samples
            .push(sample(Mode::IptablesLegacy, 1, 0, Metric::ProgramAll, 8.0));
        r.unavailable
            .push((Mode::Nftables, "nft is not installed".into()));
        let md = render_tables(&r);
        assert!(md.contains("- **nftables** could not run here: nft is not installed"));
        let section = md
            .split("### ")
            .find(|s| s.starts_with("Time to program all"))
            .unwrap();
        assert!(section.contains(
            "| Services | sluice | sluice-socket | iptables-legacy | iptables-nft | nftables | sluice/iptables-legacy | sluice/iptables-nft | sluice/nftables |"
        ));
        assert!(
            section.contains(
                "| 1 | 2.00 (2.00–2.00) | — | 8.00 (8.00–8.00) | — | did not run | 0.25 | — | — |"
            ),
            "{section}"
        );
    }

    #[test]
    fn cells_with_fewer_rounds_say_so_and_skipped_cells_say_why() {
        let mut r = Report::default();
        for round in 0..5 {
            r.samples.push(sample(
                Mode::Sluice,
                10_000,
                round,
                Metric::ProgramAll,
                100.0,
            ));
        }
        r.samples.push(sample(
            Mode::IptablesNft,
            10_000,
            0,
            Metric::ProgramAll,
            400_000.0,
        ));
        r.skipped.push((
            Mode::Nftables,
            10_000,
            "quick mode leaves it out (one load takes 88 s)".into(),
        ));
        let md = render_tables(&r);
        assert!(md.contains("- **nftables** at 10,000 Services: quick mode leaves it out"));
        assert!(
            md.contains("| 10,000 | 100 (100–100) | — | — | 400,000 (400,000–400,000) [1 of 5 rounds] | skipped |"),
            "{md}"
        );
    }

    #[test]
    fn the_chart_has_a_line_and_a_legend_entry_per_mode_that_ran() {
        let mut r = Report::default();
        for (i, n) in [1u32, 1000, 10_000].into_iter().enumerate() {
            let v = 100.0 + i as f64;
            r.samples
                .push(sample(Mode::Direct, n, 0, Metric::NewConnP50, v));
            r.samples
                .push(sample(Mode::Sluice, n, 0, Metric::NewConnP50, v));
            r.samples.push(sample(
                Mode::IptablesLegacy,
                n,
                0,
                Metric::NewConnP50,
                v * 3.0,
            ));
        }
        let svg = chart_svg(&r, Metric::NewConnP50, "test");
        assert_eq!(svg.matches("<polyline").count(), 3, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 9);
        for name in ["direct", "sluice", "iptables-legacy"] {
            assert!(svg.contains(&format!(">{name}</text>")));
        }
        assert!(!svg.contains(">nftables</text>"));
        assert!(svg.contains(">10,000</text>"));
        // The y axis reaches the largest value (306) at a round number.
        assert!(svg.contains(">500</text>"));
    }

    #[test]
    fn nice_ceiling_picks_round_axis_tops() {
        assert_eq!(nice_ceiling(306.0), 500.0);
        assert_eq!(nice_ceiling(180.0), 200.0);
        assert_eq!(nice_ceiling(2.1), 2.5);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }
}
