//! The terminal view of `overhead top` (ratatui): a header with drops and
//! notes, the VM table and the cgroup table, redrawn every interval.
//! q, Esc or Ctrl-C quits.

use crate::report::{self, Report, noisy_culprits, us};
use anyhow::Result;
use ratatui::Frame;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style, Stylize};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn draw(f: &mut Frame, r: &Report, interval: Duration) {
    let [head, vms, cgs] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Percentage(40),
        Constraint::Fill(1),
    ])
    .areas(f.area());
    f.render_widget(header(r, interval), head);
    f.render_widget(vm_table(r), vms);
    f.render_widget(cgroup_table(r), cgs);
}

/// Interval, drops and programs; the first skipped program; up to two
/// noisy neighbours.
fn header(r: &Report, interval: Duration) -> Paragraph<'static> {
    let mut lines = vec![Line::from(format!(
        "overhead — interval {:.1}s (refresh {:.1}s)  drops {}  programs {}/{}   q: quit",
        r.interval_s,
        interval.as_secs_f64(),
        r.drops.values().sum::<u64>(),
        r.programs.attached.len(),
        r.programs.attached.len() + r.programs.skipped.len()
    ))];
    for s in r.programs.skipped.iter().take(1) {
        lines.push(Line::from(format!("note: {} skipped: {}", s.tracepoint, s.reason)).yellow());
    }
    for n in r.noisy.iter().take(2) {
        lines.push(
            Line::from(format!(
                "NOISY: {} p99 wait {} us; preempted most by {}",
                n.path.clone().unwrap_or_else(|| n.cgroup_id.to_string()),
                us(n.rq_p99_ns),
                noisy_culprits(n)
            ))
            .red()
            .bold(),
        );
    }
    Paragraph::new(lines)
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn vm_table(r: &Report) -> Table<'static> {
    let rows: Vec<Row> = r
        .vms
        .iter()
        .flat_map(|vm| {
            vm.vcpus
                .iter()
                .map(move |v| Row::new(report::vcpu_cells(vm, v)))
        })
        .collect();
    let widths = [8, 8, 5, 16, 9, 10, 10].map(Constraint::Length);
    let header = [
        "PID",
        "TID",
        "VCPU",
        "COMM",
        "EXITS",
        "EXIT_ms",
        "RQDLY_ms",
        "TOP EXITS",
    ];
    Table::new(rows, widths.into_iter().chain([Constraint::Fill(1)]))
        .header(Row::new(header).style(bold()))
        .block(
            Block::bordered()
                .title(" VMs / vCPUs (by host cost: busy exit time or run-queue delay) "),
        )
}

fn cgroup_table(r: &Report) -> Table<'static> {
    let rows: Vec<Row> = r
        .cgroups
        .iter()
        .map(|c| {
            let row = Row::new(report::cgroup_cells(c));
            if c.noisy { row.red() } else { row }
        })
        .collect();
    let widths = [18, 9, 7, 9, 8, 9, 9, 6].map(Constraint::Length);
    let header = [
        "CGROUP",
        "CONTAINER",
        "CPU_ms",
        "WAITS",
        "RQ_ms",
        "p50_us",
        "p99_us",
        "max_us",
        "THRTL",
        "WAITED BEHIND (ms)",
    ];
    let constraints = std::iter::once(Constraint::Percentage(25))
        .chain(widths)
        .chain([Constraint::Fill(1)]);
    Table::new(rows, constraints)
        .header(Row::new(header).style(bold()))
        .block(Block::bordered().title(" Cgroups (by run-queue wait) "))
}

/// Run the live view until q/Esc/Ctrl-C, a stop signal, or `iterations`.
pub fn run(
    interval: Duration,
    iterations: Option<u64>,
    stop: &AtomicBool,
    mut next: impl FnMut() -> Result<Report>,
) -> Result<()> {
    let mut term = ratatui::try_init()?;
    let result = (|| -> Result<()> {
        let mut n = 0;
        let mut last: Option<Report> = None;
        term.draw(|f| {
            f.render_widget(
                Paragraph::new("overhead: collecting the first interval…"),
                f.area(),
            )
        })?;
        let mut due = Instant::now() + interval;
        while !stop.load(Ordering::SeqCst) && iterations.is_none_or(|m| n < m) {
            let wait = due
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            if event::poll(wait)?
                && let Event::Key(k) = event::read()?
            {
                let ctrl_c =
                    k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || k.code == KeyCode::Char('q') || k.code == KeyCode::Esc {
                    break;
                }
            }
            if Instant::now() >= due {
                last = Some(next()?);
                n += 1;
                due = Instant::now() + interval;
            }
            if let Some(r) = &last {
                term.draw(|f| draw(f, r, interval))?;
            }
        }
        Ok(())
    })();
    ratatui::restore();
    result
}
