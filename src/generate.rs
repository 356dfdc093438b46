//! `ringlb generate man DIR` and `ringlb generate completions SHELL DIR`:
//! the man page and shell completions, made from the same clap definition
//! that parses the command line, so they cannot drift from it. Hidden from
//! `--help`: packagers call it (packaging/build-deb.sh), operators read the
//! result.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;

use crate::cli::Cli;

#[derive(Subcommand, Debug, Clone)]
pub enum Target {
    /// Write DIR/ringlb.1
    Man { dir: PathBuf },
    /// Write the completion script for SHELL into DIR
    Completions { shell: Shell, dir: PathBuf },
}

pub fn run(target: &Target) -> ExitCode {
    let written = match target {
        Target::Man { dir } => write_man(dir),
        Target::Completions { shell, dir } => write_completions(*shell, dir),
    };
    match written {
        Ok(path) => {
            let _ = writeln!(std::io::stdout(), "{}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ringlb: cannot generate {target:?}: {e}");
            ExitCode::from(1)
        }
    }
}

fn command() -> clap::Command {
    // The name the operator types, whatever the binary file is called.
    Cli::command().bin_name("ringlb")
}

/// The command as operators see it: clap's completion scripts would
/// otherwise offer the hidden `generate` subcommand.
fn visible_command() -> clap::Command {
    let full = command();
    let visible = full.get_subcommands().filter(|s| !s.is_hide_set()).cloned();
    clap::Command::new("ringlb")
        .bin_name("ringlb")
        .args(full.get_arguments().cloned())
        .subcommands(visible)
}

fn write_completions(shell: Shell, dir: &Path) -> std::io::Result<PathBuf> {
    clap_complete::generate_to(shell, &mut visible_command(), "ringlb", dir)
}

fn write_man(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("ringlb.1");
    let mut page = Vec::new();
    render_man(&mut page)?;
    std::fs::write(&path, page)?;
    Ok(path)
}

/// clap_mangen's sections for what clap knows (synopsis, options), then
/// the sections an operator looks for in a daemon's page. clap_mangen's
/// own subcommand section points to pages that do not exist
/// (ringlb-demo(1)) and its after-help section loses the line breaks of
/// the examples, so both are written here.
fn render_man(out: &mut Vec<u8>) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(command())
        .source(format!("ringlb {}", env!("CARGO_PKG_VERSION")))
        .manual("ringlb manual");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    out.extend_from_slice(DESCRIPTION.as_bytes());
    man.render_options_section(out)?;
    out.extend_from_slice(b".SH COMMANDS\n");
    for sub in visible_command().get_subcommands() {
        let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let line = format!(
            ".TP\n\\fBringlb {}\\fR\n{}\n",
            sub.get_name(),
            roff_text(&about)
        );
        out.extend_from_slice(line.as_bytes());
    }
    out.extend_from_slice(MAN_SECTIONS.as_bytes());
    Ok(())
}

/// Plain text as a roff line: a leading dot or quote would be a request,
/// a backslash an escape, a hyphen a typographic dash.
fn roff_text(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    match escaped.chars().next() {
        Some('.' | '\'') => format!("\\&{escaped}"),
        _ => escaped,
    }
}

const DESCRIPTION: &str = r#".SH DESCRIPTION
ringlb spreads client TCP connections over the backends of each frontend
that are up (round robin, or all to the first one in active\-passive mode),
checks the backends itself and moves traffic when one dies, hangs or comes
back. One worker thread per core, each with its own io_uring and its own
\fBSO_REUSEPORT\fR listener. Run it with flags for one frontend, or with
\fB\-\-config\fR for several.
"#;

/// roff for what clap does not know about.
const MAN_SECTIONS: &str = r#".SH EXAMPLES
.nf
ringlb \-\-listen 0.0.0.0:80 \-\-backend 10.0.0.1:8080 \-\-backend 10.0.0.2:8080
ringlb \-\-listen 0.0.0.0:5432 \-\-mode active\-passive \-\-backend db1:5432 \-\-backend db2:5432
ringlb \-\-config /etc/ringlb/ringlb.toml \-\-stats 127.0.0.1:9090
ringlb \-\-config /etc/ringlb/ringlb.toml \-\-check
ringlb demo
.fi
.SH NOTES
Durations are written 500ms, 2s, 5m, 1h, 1d; a bare number is
milliseconds. \fBRUST_LOG\fR=debug adds one log line per connection; a
stalled stderr never slows traffic (lines are dropped and counted
instead). Metrics: \fB\-\-stats\fR \fIADDR\fR serves Prometheus text on
\fIhttp://ADDR/metrics\fR.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGUSR1\fR, \fBSIGPWR\fR
Leave: report not ready at once (\fI/ready\fR 503, \fBringlb ctl ready\fR
exits 1) and keep serving for the leave delay (2s by default), so that
keepalived or a BGP speaker moves the address away first; then drain:
stop accepting, let open connections finish for up to the drain timeout
(30s by default), then reset what is left. A second one during the
delay drains at once; one more resets every connection at once.
.TP
\fBSIGINT\fR
Drain at once, without the leave delay (an operator at a terminal).
.TP
\fBSIGHUP\fR, \fBSIGUSR2\fR
Reload the \fB\-\-config\fR file in place: the difference is applied
without dropping connections; a bad file changes nothing and is logged
with its file and line. \fBworkers\fR, \fBbuffers\fR and \fBstats\fR
need a restart.
.TP
\fBSIGQUIT\fR
Log a status line per frontend.
.SH SYSTEMD
Under a unit with \fBType=notify\fR, ringlb sends \fBREADY=1\fR once every
listener is bound and every worker runs, \fBRELOADING=1\fR then
\fBREADY=1\fR around a reload, and \fBSTOPPING=1\fR when a drain or stop
begins, to the socket named by \fB$NOTIFY_SOCKET\fR (a path or an
abstract \fI@name\fR). Without that variable it sends nothing.
.SH EXIT STATUS
.TP
\fB0\fR
Stopped after a drain, or \fB\-\-check\fR found the file valid.
.TP
\fB1\fR
A bad configuration file, or a failure to start (address in use, io_uring
disabled) or to stop in time.
.TP
\fB2\fR
A wrong flag.
.SH FILES
.TP
\fI/etc/ringlb/ringlb.toml\fR
The configuration the packaged service runs; \fBringlb \-\-config
/etc/ringlb/ringlb.toml \-\-check\fR validates it.
.TP
\fI/etc/default/ringlb\fR
Extra flags for the packaged service (\fBRINGLB_OPTS\fR), such as
\fB\-\-stats\fR.
.TP
\fI/usr/share/doc/ringlb/examples/foobar.toml\fR
Every configuration key, its default and its HAProxy equivalent.
.SH SEE ALSO
\fBsystemctl\fR(1), \fBsystemd.service\fR(5), \fBhaproxy\fR(1)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_man_page_documents_every_visible_flag() {
        let mut page = Vec::new();
        render_man(&mut page).expect("render");
        let page = String::from_utf8(page).expect("utf-8");
        for arg in command().get_arguments().filter(|a| !a.is_hide_set()) {
            if let Some(long) = arg.get_long() {
                let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
                assert!(page.contains(&roff), "--{long} missing from the man page");
            }
        }
        assert!(
            page.contains("\\fBringlb demo\\fR"),
            "the demo command is listed"
        );
        assert!(!page.contains("generate"), "the hidden subcommand leaked");
    }
}
