//! `top pods|containers|nodes`: every agent's latest table, merged, sorted and redrawn like
//! `top`; keys change the sort. `--once` prints one table (`-o json` for scripts).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::time::Duration;

use podscope_core::session::{Message, Request, TopRow, TopScope, TopTable};
use serde_json::json;

use crate::cli::{Format, SortKey, TopArgs, TopScopeArg};
use crate::error::PluginError;
use crate::output;
use crate::targets::TargetSpec;
use crate::transport::{open_all, stream_all, Route};
use crate::Context;

pub async fn run(context: &mut Context, args: TopArgs) -> Result<(), PluginError> {
    let scope = TopScope::from(args.scope);
    let has_target = args.target.is_some() || args.selection.selector.is_some();
    let routes: Vec<(Route, Vec<podscope_core::session::Target>)> = if !has_target
        && (args.scope == TopScopeArg::Nodes || context.cluster.agent_address.is_some())
    {
        // Every agent, its whole node (the agent names what it sees by cgroup).
        let routes = context.every_agent().await?;
        routes
            .into_iter()
            .map(|route| (route, Vec::new()))
            .collect()
    } else {
        // Without a target, the pods of the namespace (-n, -A), as `kubectl top pods`.
        let spec = match (&args.target, &args.selection.selector) {
            (None, None) => TargetSpec::Selector(String::new()),
            (target, selector) => TargetSpec::parse(target.as_deref(), selector.as_deref())?,
        };
        let by_node = context
            .resolve(&spec, args.selection.container.as_deref())
            .await?;
        context.routes(&by_node).await?
    };
    let request = |targets: Vec<podscope_core::session::Target>| Request::Top {
        scope,
        targets,
        interval: args.interval,
        once: args.once,
    };
    let (sessions, _) = open_all(
        context.made_client(),
        routes.iter().map(|(route, _)| route.clone()).collect(),
        |route| {
            let targets = routes
                .iter()
                .find(|(r, _)| r == route)
                .map(|(_, t)| t.clone())
                .unwrap_or_default();
            request(targets)
        },
    )
    .await?;
    let mut waiting: std::collections::BTreeSet<String> =
        sessions.iter().map(|s| s.route_node.clone()).collect();
    let mut messages = stream_all(sessions);
    let mut view = TopView {
        scope: args.scope,
        sort: args.sort,
        tables: BTreeMap::new(),
    };
    if args.once {
        // One table from every node (or its end).
        while !waiting.is_empty() {
            match messages.recv().await {
                None => break,
                Some((node, Ok(Message::Top(table)))) => {
                    waiting.remove(&node);
                    view.tables.insert(node, table);
                }
                Some((node, Ok(Message::End { error, .. }))) => {
                    if let Some(error) = error {
                        return Err(PluginError::from_session(&node, error));
                    }
                    waiting.remove(&node);
                }
                Some((_, Ok(_))) => {}
                Some((_, Err(error))) => return Err(error),
            }
        }
        let text = match args.output {
            Format::Table => view.table(),
            format => output::object(format, &view.json()),
        };
        print!("{text}");
        return Ok(());
    }
    live(view, messages, args.interval).await
}

/// The merged state of every agent's latest table.
struct TopView {
    scope: TopScopeArg,
    sort: SortKey,
    tables: BTreeMap<String, TopTable>,
}

impl TopView {
    /// Every row with its node, filtered and sorted.
    fn rows(&self) -> Vec<(String, TopRow)> {
        let mut rows: Vec<(String, TopRow)> = self
            .tables
            .iter()
            .flat_map(|(node, table)| {
                table
                    .rows
                    .iter()
                    .map(move |row| (node.clone(), row.clone()))
            })
            .collect();
        let name = |(node, row): &(String, TopRow)| {
            (
                node.clone(),
                row.namespace.clone(),
                row.pod.clone(),
                row.container.clone(),
            )
        };
        let value = |row: &TopRow| match self.sort {
            SortKey::Cpu => row.cpu_cores,
            SortKey::Runq => row.kernel.runq_latency_p99_seconds,
            SortKey::Syscalls => row.kernel.syscalls_per_second,
            SortKey::Opens => row.kernel.opens_per_second,
            SortKey::Retransmits => row.kernel.tcp_retransmits_per_second,
            SortKey::Requests => row.kernel.requests_per_second,
            SortKey::Name => None,
        };
        rows.sort_by(|a, b| {
            // Largest first, rows without the value last, then by name for a stable screen.
            let by_value = match (value(&a.1), value(&b.1)) {
                (Some(x), Some(y)) => y.total_cmp(&x),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            };
            by_value.then_with(|| name(a).cmp(&name(b)))
        });
        rows
    }

    fn table(&self) -> String {
        let mut header = vec!["NODE"];
        match self.scope {
            TopScopeArg::Pods => header.extend(["NAMESPACE", "POD"]),
            TopScopeArg::Containers => header.extend(["NAMESPACE", "POD", "CONTAINER"]),
            TopScopeArg::Nodes => {}
        }
        header.extend([
            "CPU",
            "RUNQ-P50",
            "RUNQ-P99",
            "SYSCALLS/S",
            "OPENS/S",
            "RETRANS/S",
            "REQ/S",
            "REQ-P99",
        ]);
        let rows: Vec<Vec<String>> = self
            .rows()
            .into_iter()
            .map(|(node, row)| {
                let mut cells = vec![node];
                match self.scope {
                    TopScopeArg::Pods => cells.extend([row.namespace.clone(), row.pod.clone()]),
                    TopScopeArg::Containers => cells.extend([
                        row.namespace.clone(),
                        row.pod.clone(),
                        row.container.clone(),
                    ]),
                    TopScopeArg::Nodes => {}
                }
                cells.extend([
                    millicores(row.cpu_cores),
                    latency(row.kernel.runq_latency_p50_seconds),
                    latency(row.kernel.runq_latency_p99_seconds),
                    rate(row.kernel.syscalls_per_second),
                    rate(row.kernel.opens_per_second),
                    rate(row.kernel.tcp_retransmits_per_second),
                    rate(row.kernel.requests_per_second),
                    latency(row.kernel.request_latency_p99_seconds),
                ]);
                cells
            })
            .collect();
        output::table(&header, &rows)
    }

    fn json(&self) -> serde_json::Value {
        let rows: Vec<serde_json::Value> = self
            .rows()
            .into_iter()
            .map(|(node, row)| {
                let mut value = json!(row);
                value["node"] = json!(node);
                value
            })
            .collect();
        json!({
            "scope": TopScope::from(self.scope),
            "nodes": self.tables.keys().collect::<Vec<_>>(),
            "rows": rows,
        })
    }
}

fn millicores(cores: Option<f64>) -> String {
    cores.map_or("-".into(), |c| format!("{}m", (c * 1000.0).round() as i64))
}

fn latency(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s >= 1.0 => format!("{s:.2}s"),
        Some(s) if s >= 1e-3 => format!("{:.1}ms", s * 1e3),
        Some(s) => format!("{:.0}µs", s * 1e6),
    }
}

fn rate(per_second: Option<f64>) -> String {
    per_second.map_or("-".into(), |r| format!("{r:.1}"))
}

/// The key that sorts by each column.
fn sort_for_key(key: u8) -> Option<SortKey> {
    Some(match key {
        b'c' => SortKey::Cpu,
        b'r' => SortKey::Runq,
        b's' => SortKey::Syscalls,
        b'o' => SortKey::Opens,
        b't' => SortKey::Retransmits,
        b'p' => SortKey::Requests,
        b'n' => SortKey::Name,
        _ => return None,
    })
}

async fn live(
    mut view: TopView,
    mut messages: tokio::sync::mpsc::Receiver<crate::transport::NodeMessage>,
    interval: Duration,
) -> Result<(), PluginError> {
    let _terminal = Terminal::enter();
    let mut keys = read_keys();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut ticker = tokio::time::interval(interval);
    let mut notes: BTreeMap<String, String> = BTreeMap::new();
    let mut open = true;
    // Without a terminal on stdin there are no keys: Ctrl-C ends the view.
    let mut keys_open = true;
    loop {
        tokio::select! {
            message = messages.recv(), if open => match message {
                None => open = false,
                Some((node, Ok(Message::Top(table)))) => {
                    view.tables.insert(node, table);
                }
                Some((node, Ok(Message::End { error, reason }))) => {
                    let why = error.map_or(format!("{reason:?}"), |e| e.message);
                    notes.insert(node, format!("session ended: {why}"));
                }
                Some((_, Ok(_))) => continue,
                Some((node, Err(error))) => {
                    notes.insert(node, error.to_string());
                }
            },
            key = keys.recv(), if keys_open => match key {
                None => {
                    keys_open = false;
                    continue;
                }
                Some(b'q') => return Ok(()),
                Some(key) => match sort_for_key(key) {
                    Some(sort) => view.sort = sort,
                    None => continue,
                },
            },
            _ = ticker.tick() => {}
            _ = &mut interrupted => return Ok(()),
        }
        let mut screen = format!(
            "podscope top {} — {} node(s) — sorted by {} — keys: c r s o t p n sort, q quit\n\n",
            match view.scope {
                TopScopeArg::Pods => "pods",
                TopScopeArg::Containers => "containers",
                TopScopeArg::Nodes => "nodes",
            },
            view.tables.len(),
            sort_name(view.sort),
        );
        screen.push_str(&view.table());
        for (node, note) in &notes {
            screen.push_str(&format!("\n{node}: {note}"));
        }
        // Home, clear, then the screen with CRLF: the terminal is in raw-ish mode.
        let text = format!("\x1b[H\x1b[2J{}", screen.replace('\n', "\r\n"));
        let mut out = std::io::stdout().lock();
        if out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return Ok(());
        }
    }
}

fn sort_name(sort: SortKey) -> &'static str {
    match sort {
        SortKey::Cpu => "CPU",
        SortKey::Runq => "RUNQ-P99",
        SortKey::Syscalls => "SYSCALLS/S",
        SortKey::Opens => "OPENS/S",
        SortKey::Retransmits => "RETRANS/S",
        SortKey::Requests => "REQ/S",
        SortKey::Name => "NAME",
    }
}

/// Key presses, one byte each, from a thread blocked on stdin (closed at its end of file).
fn read_keys() -> tokio::sync::mpsc::UnboundedReceiver<u8> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::Read as _;
        let mut stdin = std::io::stdin();
        let mut byte = [0u8; 1];
        while let Ok(1) = stdin.read(&mut byte) {
            if sender.send(byte[0]).is_err() {
                return;
            }
        }
    });
    receiver
}

/// The terminal while the view runs: keys read one at a time without echo, the alternate
/// screen; all restored on drop. Nothing changes when stdin is not a terminal.
struct Terminal {
    saved: Option<libc::termios>,
}

impl Terminal {
    fn enter() -> Terminal {
        // SAFETY: isatty/tcgetattr/tcsetattr on fd 0 with a valid termios buffer.
        let saved = unsafe {
            if libc::isatty(0) != 1 {
                None
            } else {
                let mut saved: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(0, &mut saved) != 0 {
                    None
                } else {
                    let mut raw = saved;
                    raw.c_lflag &= !(libc::ICANON | libc::ECHO);
                    raw.c_cc[libc::VMIN] = 1;
                    raw.c_cc[libc::VTIME] = 0;
                    libc::tcsetattr(0, libc::TCSANOW, &raw);
                    Some(saved)
                }
            }
        };
        print!("\x1b[?1049h\x1b[?25l");
        let _ = std::io::stdout().flush();
        Terminal { saved }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        print!("\x1b[?25h\x1b[?1049l");
        let _ = std::io::stdout().flush();
        if let Some(saved) = &self.saved {
            // SAFETY: restores the attributes read in `enter`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, saved);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podscope_core::session::KernelColumns;

    fn row(namespace: &str, pod: &str, cpu: Option<f64>, syscalls: f64) -> TopRow {
        TopRow {
            namespace: namespace.into(),
            pod: pod.into(),
            cpu_cores: cpu,
            kernel: KernelColumns {
                syscalls_per_second: Some(syscalls),
                runq_latency_p99_seconds: Some(0.0021),
                ..KernelColumns::default()
            },
            ..TopRow::default()
        }
    }

    fn view(sort: SortKey) -> TopView {
        let table = |node: &str, rows| TopTable {
            time_unix_nano: 1,
            node: node.into(),
            rows,
        };
        TopView {
            scope: TopScopeArg::Pods,
            sort,
            tables: BTreeMap::from([
                (
                    "n1".to_string(),
                    table(
                        "n1",
                        vec![
                            row("shop", "web-0", Some(0.25), 10.0),
                            row("kube-system", "dns", None, 99.0),
                        ],
                    ),
                ),
                (
                    "n2".to_string(),
                    table("n2", vec![row("shop", "web-1", Some(1.5), 5.0)]),
                ),
            ]),
        }
    }

    #[test]
    fn rows_of_every_node_sort_by_the_chosen_column() {
        let pods = |view: &TopView| {
            view.rows()
                .into_iter()
                .map(|(_, r)| r.pod)
                .collect::<Vec<_>>()
        };
        assert_eq!(pods(&view(SortKey::Cpu)), ["web-1", "web-0", "dns"]);
        assert_eq!(pods(&view(SortKey::Syscalls)), ["dns", "web-0", "web-1"]);
        assert_eq!(sort_for_key(b's'), Some(SortKey::Syscalls));
        assert_eq!(sort_for_key(b'z'), None);
    }

    #[test]
    fn the_table_shows_millicores_latencies_and_rates() {
        let text = view(SortKey::Cpu).table();
        assert_eq!(
            text,
            "NODE  NAMESPACE    POD    CPU    RUNQ-P50  RUNQ-P99  SYSCALLS/S  OPENS/S  RETRANS/S  REQ/S  REQ-P99\n\
             n2    shop         web-1  1500m  -         2.1ms     5.0         -        -          -      -\n\
             n1    shop         web-0  250m   -         2.1ms     10.0        -        -          -      -\n\
             n1    kube-system  dns    -      -         2.1ms     99.0        -        -          -      -\n"
        );
    }

    #[test]
    fn json_has_every_row_with_its_node() {
        let value = view(SortKey::Cpu).json();
        assert_eq!(value["scope"], "pods");
        assert_eq!(value["nodes"], json!(["n1", "n2"]));
        assert_eq!(value["rows"][0]["pod"], "web-1");
        assert_eq!(value["rows"][0]["node"], "n2");
        assert_eq!(value["rows"][0]["cpu_cores"], 1.5);
        assert_eq!(value["rows"].as_array().unwrap().len(), 3);
    }
}
