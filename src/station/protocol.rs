//! The serial line protocol (docs/protocol.md): ASCII lines ending in CR LF.
use std::fmt::Write;

use super::{Decided, Event};

/// `RES <id> <OK|NG|ERR> <score|-> <latency_ms>[ <reason>]`
pub fn result_line(d: &Decided, out: &mut String) {
    out.clear();
    let _ = write!(out, "RES {} {} ", d.id, d.verdict.as_str());
    match d.score {
        Some(s) if s.is_finite() => {
            let _ = write!(out, "{s:.6}");
        }
        _ => out.push('-'),
    }
    let _ = write!(out, " {}", d.latency().as_millis());
    if let Some(reason) = &d.reason {
        out.push(' ');
        push_ascii_word(reason, out);
    }
    out.push_str("\r\n");
}

/// `HB <seq> <READY|FAULT> <ok> <ng> <err>`
pub fn heartbeat_line(seq: u64, ready: bool, counts: [u64; 3]) -> String {
    let state = if ready { "READY" } else { "FAULT" };
    format!(
        "HB {seq} {state} {} {} {}\r\n",
        counts[0], counts[1], counts[2]
    )
}

pub fn event_line(event: &Event) -> String {
    let mut out = String::new();
    match event {
        Event::Ready => out.push_str("READY"),
        Event::Fault(reason) => {
            out.push_str("FAULT ");
            push_ascii_word(reason, &mut out);
        }
        Event::Reloaded(Ok(threshold)) => {
            let _ = write!(out, "ACK RELOAD {threshold:.6}");
        }
        Event::Reloaded(Err(reason)) => {
            out.push_str("NAK RELOAD ");
            push_ascii_word(reason, &mut out);
        }
        Event::Status(text) => {
            out.push_str("STATUS ");
            push_ascii_word(text, &mut out);
        }
    }
    out.push_str("\r\n");
    out
}

/// Free text on one ASCII line: non-ASCII and control characters become `?`, and it is cut at
/// 200 characters so a long error cannot flood a PLC's receive buffer.
fn push_ascii_word(text: &str, out: &mut String) {
    for c in text.chars().take(200) {
        out.push(if c.is_ascii() && !c.is_ascii_control() {
            c
        } else {
            '?'
        });
    }
}

/// A command from the PLC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Capture one part (with `trigger.kind = "serial"`).
    Trigger,
    Status,
    /// Reload the calibration file.
    Reload,
    Ping,
    Unknown(String),
}

pub fn parse_command(line: &str) -> Option<Command> {
    let word = line.trim();
    if word.is_empty() {
        return None;
    }
    Some(match word.to_ascii_uppercase().as_str() {
        "TRIG" => Command::Trigger,
        "STATUS" => Command::Status,
        "RELOAD" => Command::Reload,
        "PING" => Command::Ping,
        _ => Command::Unknown(word.chars().take(40).collect()),
    })
}
