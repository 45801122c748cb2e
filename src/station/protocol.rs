//! The serial line protocol (docs/protocol.md): ASCII lines ending in CR LF.
//!
//! Every line the station sends is built here, so that no free text (an error, a status, an echo
//! of what the PLC sent) can put a control character, a non-ASCII byte or a second line on the
//! wire.
use std::fmt::Write;

use super::{Decided, Event};

/// Longest free text (reason, status) on one line, so a long error cannot flood a PLC's receive
/// buffer.
pub const MAX_TEXT: usize = 200;

/// Input bytes of a bad command echoed in its NAK.
const EXCERPT_BYTES: usize = 16;
/// Characters those bytes may take once escaped (`\xNN` is four), so that a NAK of any input stays
/// well within 80 bytes.
const EXCERPT_CHARS: usize = 32;

const ELLIPSIS: &str = "...";

/// `RES <id> <OK|NG|ERR> <score|-> <latency_ms> <run>[ <reason>]`, or `REP ...` with the same
/// fields for a line sent again after a reconnection (acknowledged mode).
pub fn result_line(d: &Decided, run: u64, repeat: bool, out: &mut String) {
    out.clear();
    let word = if repeat { "REP" } else { "RES" };
    let _ = write!(out, "{word} {} {} ", d.id, d.verdict.as_str());
    match d.score {
        Some(s) if s.is_finite() => {
            let _ = write!(out, "{s:.6}");
        }
        _ => out.push('-'),
    }
    let _ = write!(out, " {} {run}", d.latency().as_millis());
    if let Some(reason) = &d.reason {
        out.push(' ');
        push_free_text(reason, out);
    }
    out.push_str("\r\n");
}

/// `HB <seq> <READY|FAULT> <ok> <ng> <err> <run>`
pub fn heartbeat_line(seq: u64, ready: bool, counts: [u64; 3], run: u64) -> String {
    let state = if ready { "READY" } else { "FAULT" };
    format!(
        "HB {seq} {state} {} {} {} {run}\r\n",
        counts[0], counts[1], counts[2]
    )
}

/// `READY <run>`, `FAULT <text>`, `ACK RELOAD <threshold>`, `NAK RELOAD <text>`,
/// `ACK RELOAD MODEL <threshold> <model digest>`, `NAK RELOAD MODEL <text>`, `STATUS <text>`.
pub fn event_line(event: &Event, run: u64) -> String {
    let mut out = String::new();
    match event {
        Event::Ready => {
            let _ = write!(out, "READY {run}");
        }
        Event::Fault(reason) => {
            out.push_str("FAULT ");
            push_free_text(reason, &mut out);
        }
        Event::Reloaded(Ok(threshold)) => {
            let _ = write!(out, "ACK RELOAD {threshold:.6}");
        }
        Event::Reloaded(Err(reason)) => {
            out.push_str("NAK RELOAD ");
            push_free_text(reason, &mut out);
        }
        Event::ModelReloaded(Ok((threshold, sha256))) => {
            let short = sha256.get(..12).unwrap_or(sha256);
            let _ = write!(out, "ACK RELOAD MODEL {threshold:.6} ");
            push_free_text(short, &mut out);
        }
        Event::ModelReloaded(Err(reason)) => {
            out.push_str("NAK RELOAD MODEL ");
            push_free_text(reason, &mut out);
        }
        Event::Status(text) => {
            out.push_str("STATUS ");
            push_free_text(text, &mut out);
        }
    }
    out.push_str("\r\n");
    out
}

/// `LOST <count> <first_id>-<last_id> <run>`: the marker left where `count` lines were dropped;
/// `-` instead of the ids when none of them was a result line.
pub fn lost_line(count: u64, ids: Option<(u64, u64)>, run: u64) -> String {
    match ids {
        Some((first, last)) => format!("LOST {count} {first}-{last} {run}\r\n"),
        None => format!("LOST {count} - {run}\r\n"),
    }
}

/// `NAK <excerpt> <reason>`: the answer to a command that was not understood. Both parts are made
/// printable here, whatever the caller passes.
pub fn nak_line(excerpt: &str, reason: &str) -> String {
    let mut out = String::from("NAK ");
    out.extend(excerpt.chars().map(printable));
    out.push(' ');
    push_free_text(reason, &mut out);
    out.push_str("\r\n");
    out
}

fn printable(c: char) -> char {
    if c.is_ascii() && !c.is_ascii_control() {
        c
    } else {
        '?'
    }
}

/// Free text on one ASCII line: non-ASCII and control characters become `?`; beyond
/// [`MAX_TEXT`] characters it is cut at the last space that leaves room for `...`, so that a
/// reason is shortened but never ends in half a word (a single longer word is cut hard).
fn push_free_text(text: &str, out: &mut String) {
    let clean: String = text.chars().map(printable).collect();
    if clean.len() <= MAX_TEXT {
        out.push_str(&clean);
        return;
    }
    let room = MAX_TEXT - ELLIPSIS.len();
    // `clean` is ASCII, so byte positions are character positions.
    let kept = clean.as_bytes()[..=room]
        .iter()
        .rposition(|&b| b == b' ')
        .map(|space| clean[..space].trim_end())
        .filter(|kept| !kept.is_empty())
        .unwrap_or(&clean[..room]);
    out.push_str(kept);
    out.push_str(ELLIPSIS);
}

/// A command from the PLC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Capture one part (with `trigger.kind = "serial"`).
    Trigger,
    Status,
    /// Reload the calibration file.
    Reload,
    /// Swap in the model and calibration files (`RELOAD MODEL`).
    ReloadModel,
    Ping,
    /// `ACK <id>`: every result up to `id` arrived (acknowledged mode).
    Ack(u64),
    /// Not understood: what to answer with [`nak_line`].
    Bad {
        /// A short, escaped, printable-ASCII excerpt of the line.
        excerpt: String,
        reason: String,
    },
}

/// Parses one line from the PLC (without or with its CR/LF): words are case-insensitive and
/// surrounding whitespace is ignored; an empty line is None.
pub fn parse_command(line: &[u8]) -> Option<Command> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return None;
    }
    let mut words = line
        .split(u8::is_ascii_whitespace)
        .filter(|w| !w.is_empty());
    let first = words.next()?;
    let rest: Vec<&[u8]> = words.collect();
    let bad = |reason: &str| Command::Bad {
        excerpt: excerpt(line),
        reason: reason.into(),
    };
    let simple = [
        (&b"TRIG"[..], Command::Trigger),
        (b"STATUS", Command::Status),
        (b"PING", Command::Ping),
    ];
    if let Some((_, command)) = simple
        .into_iter()
        .find(|(word, _)| first.eq_ignore_ascii_case(word))
    {
        return Some(if rest.is_empty() {
            command
        } else {
            bad("takes no argument")
        });
    }
    if first.eq_ignore_ascii_case(b"RELOAD") {
        return Some(match rest.as_slice() {
            [] => Command::Reload,
            [what] if what.eq_ignore_ascii_case(b"MODEL") => Command::ReloadModel,
            _ => bad("RELOAD takes nothing or MODEL"),
        });
    }
    if first.eq_ignore_ascii_case(b"ACK") {
        return Some(match rest.as_slice() {
            [id] => decimal(id).map_or_else(|| bad("ACK needs a part id"), Command::Ack),
            [] => bad("ACK needs a part id"),
            _ => bad("ACK takes one part id"),
        });
    }
    Some(bad("unknown command"))
}

/// A decimal u64 of ASCII digits only (no sign, as a PLC sends it).
fn decimal(word: &[u8]) -> Option<u64> {
    if !word.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(word).ok()?.parse().ok()
}

/// The first bytes of `line`, printable non-space ASCII kept and everything else (space, control,
/// non-ASCII, the backslash itself) written `\xNN`; `...` when something was left out.
fn excerpt(line: &[u8]) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for &b in line.iter().take(EXCERPT_BYTES) {
        let escaped = !b.is_ascii_graphic() || b == b'\\';
        let width = if escaped { 4 } else { 1 };
        if out.len() + width > EXCERPT_CHARS {
            break;
        }
        if escaped {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(char::from(b));
        }
        shown += 1;
    }
    if shown < line.len() {
        out.push_str(ELLIPSIS);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::station::Verdict;

    fn decided(id: u64, score: Option<f32>, reason: Option<&str>) -> Decided {
        let verdict = if reason.is_some() {
            Verdict::Ng
        } else {
            Verdict::Ok
        };
        Decided::for_test(id, verdict, score, reason)
    }

    fn is_one_printable_line(line: &str) -> bool {
        let body = line.strip_suffix("\r\n").unwrap_or("\n");
        body.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    }

    #[test]
    fn result_lines_carry_the_run_after_the_latency() {
        let mut line = String::new();
        result_line(&decided(7, Some(0.5), None), 42, false, &mut line);
        let fields: Vec<&str> = line.trim_end().split(' ').collect();
        assert_eq!(fields[..4], ["RES", "7", "OK", "0.500000"], "{line}");
        assert_eq!(fields[5], "42", "{line}");
        assert_eq!(fields.len(), 6, "{line}");
        result_line(&decided(8, None, Some("deadline")), 42, true, &mut line);
        assert!(line.starts_with("REP 8 NG - "), "{line}");
        assert!(line.ends_with(" 42 deadline\r\n"), "{line}");
    }

    #[test]
    fn heartbeat_ready_and_lost_lines() {
        assert_eq!(
            heartbeat_line(3, false, [1, 2, 3], 9),
            "HB 3 FAULT 1 2 3 9\r\n"
        );
        assert_eq!(event_line(&Event::Ready, 9), "READY 9\r\n");
        assert_eq!(
            event_line(&Event::Reloaded(Ok(0.5)), 9),
            "ACK RELOAD 0.500000\r\n"
        );
        let sha = format!("0123456789ab{}", "f".repeat(52));
        assert_eq!(
            event_line(&Event::ModelReloaded(Ok((2.25, sha))), 9),
            "ACK RELOAD MODEL 2.250000 0123456789ab\r\n"
        );
        assert_eq!(
            event_line(&Event::ModelReloaded(Err("no\nway".into())), 9),
            "NAK RELOAD MODEL no?way\r\n"
        );
        assert_eq!(lost_line(5, Some((10, 14)), 9), "LOST 5 10-14 9\r\n");
        assert_eq!(lost_line(2, None, 9), "LOST 2 - 9\r\n");
    }

    #[test]
    fn a_reason_with_cr_lf_stays_one_line() {
        let line = event_line(&Event::Fault("serial: gone\r\nREADY 1\r\n".into()), 1);
        assert_eq!(line, "FAULT serial: gone??READY 1??\r\n");
        let mut res = String::new();
        result_line(&decided(1, None, Some("bad\r\né")), 1, false, &mut res);
        assert!(res.ends_with(" bad???\r\n"), "{res:?}");
        assert!(is_one_printable_line(&res), "{res:?}");
    }

    #[test]
    fn a_long_reason_is_cut_at_a_word_boundary() {
        let words = "calibration threshold refused ".repeat(10);
        assert_eq!(words.len(), 300);
        let line = event_line(&Event::Reloaded(Err(words.clone())), 1);
        let reason = line
            .strip_prefix("NAK RELOAD ")
            .and_then(|l| l.strip_suffix("\r\n"))
            .unwrap();
        assert!(reason.len() <= MAX_TEXT, "{}", reason.len());
        let kept = reason.strip_suffix("...").unwrap();
        assert!(words.starts_with(kept), "{reason}");
        assert!(
            words[kept.len()..].starts_with(' '),
            "cut mid-word: {reason}"
        );
        assert!(!kept.ends_with(' '), "{reason:?}");
        // Exactly 200 characters are kept whole.
        let fits = "x".repeat(MAX_TEXT);
        assert_eq!(
            event_line(&Event::Status(fits.clone()), 1),
            format!("STATUS {fits}\r\n")
        );
    }

    #[test]
    fn a_single_overlong_word_is_cut_hard() {
        let line = event_line(&Event::Status("a".repeat(500)), 1);
        let text = line.trim_end().strip_prefix("STATUS ").unwrap();
        assert_eq!(text.len(), MAX_TEXT);
        assert_eq!(text, format!("{}...", "a".repeat(MAX_TEXT - 3)));
        // A space only at the very start leaves no word to keep: cut hard too.
        let line = event_line(&Event::Status(format!(" {}", "b".repeat(300))), 1);
        assert!(
            line.starts_with("STATUS  bbb") && line.ends_with("b...\r\n"),
            "{line}"
        );
    }

    #[test]
    fn commands_are_case_and_whitespace_insensitive() {
        assert_eq!(parse_command(b" trig\r"), Some(Command::Trigger));
        assert_eq!(parse_command(b"Status\r\n"), Some(Command::Status));
        assert_eq!(parse_command(b"RELOAD"), Some(Command::Reload));
        assert_eq!(
            parse_command(b"reload  Model\r"),
            Some(Command::ReloadModel)
        );
        assert_eq!(parse_command(b"\tping "), Some(Command::Ping));
        assert_eq!(parse_command(b" \r\n"), None);
        assert_eq!(parse_command(b""), None);
        assert_eq!(parse_command(b"ack 17"), Some(Command::Ack(17)));
        assert_eq!(
            parse_command(b"ACK\t18446744073709551615"),
            Some(Command::Ack(u64::MAX))
        );
    }

    fn bad_reason(line: &[u8]) -> String {
        match parse_command(line) {
            Some(Command::Bad { reason, .. }) => reason,
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn ack_needs_one_decimal_id_and_commands_take_no_arguments() {
        for line in [
            &b"ACK"[..],
            b"ACK x",
            b"ACK +1",
            b"ACK -1",
            b"ACK 18446744073709551616",
        ] {
            assert_eq!(bad_reason(line), "ACK needs a part id", "{line:?}");
        }
        assert_eq!(bad_reason(b"ACK 1 2"), "ACK takes one part id");
        assert_eq!(bad_reason(b"TRIG 3"), "takes no argument");
        assert_eq!(bad_reason(b"RELOAD X"), "RELOAD takes nothing or MODEL");
        assert_eq!(
            bad_reason(b"RELOAD MODEL NOW"),
            "RELOAD takes nothing or MODEL"
        );
        assert_eq!(bad_reason(b"EJECT"), "unknown command");
    }

    #[test]
    fn a_nak_echoes_an_escaped_printable_excerpt() {
        let Some(Command::Bad { excerpt, reason }) = parse_command(b"EJ\x07\xff CT") else {
            panic!("not a bad command");
        };
        assert_eq!(excerpt, r"EJ\x07\xFF\x20CT");
        let nak = nak_line(&excerpt, &reason);
        assert_eq!(nak, "NAK EJ\\x07\\xFF\\x20CT unknown command\r\n");
        assert!(is_one_printable_line(&nak), "{nak:?}");
        assert_eq!(
            parse_command(b"back\\slash"),
            Some(Command::Bad {
                excerpt: r"back\x5Cslash".into(),
                reason: "unknown command".into()
            })
        );
    }

    #[test]
    fn a_long_or_binary_command_is_excerpted_briefly() {
        let Some(Command::Bad { excerpt, .. }) = parse_command(&[b'A'; 40]) else {
            panic!("not a bad command");
        };
        assert_eq!(excerpt, format!("{}...", "A".repeat(EXCERPT_BYTES)));
        let Some(Command::Bad { excerpt, reason }) = parse_command(&[0xC3; 40]) else {
            panic!("not a bad command");
        };
        assert_eq!(excerpt, format!("{}...", r"\xC3".repeat(EXCERPT_CHARS / 4)));
        assert!(nak_line(&excerpt, &reason).len() <= 80);
        // A caller's own text cannot break the line either.
        assert_eq!(
            nak_line("T\nRIG", "queue\rfull"),
            "NAK T?RIG queue?full\r\n"
        );
    }
}
