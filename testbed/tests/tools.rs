//! `tools.txt` lists every external command the project runs, so that `./x setup` installs all
//! of them. At run time `testbed::cmd::command` refuses anything unlisted; this test holds the
//! sources to the same rule, including code the tests never run (the benchmark):
//! - no file but `testbed/src/cmd.rs` starts a process (`Command::new`, fork, exec*, system);
//! - every literal command passed to a spawning function (`run(&["ip", ...])`,
//!   `ns.exec(&["nft", ...])`, `ip netns exec NS prog ...`) is listed;
//! - every command `./x` and the scripts in `.ci/` run is listed.
use std::path::{Path, PathBuf};

use proc_macro2::Span;
use syn::{
    Expr, ExprCall, ExprMethodCall, ExprPath, Lit, Macro, punctuated::Punctuated, spanned::Spanned,
    visit::Visit,
};
use testbed::tools;

/// The one file allowed to start processes.
const ONE_PLACE: &str = "testbed/src/cmd.rs";

/// Functions and methods that take an argv (or a program) and run it.
const SPAWNERS: &[&str] = &[
    "command",
    "run",
    "run_timeout",
    "output",
    "output_with_input",
    "exec",
    "exec_timeout",
    "exec_output",
    "exec_with_input",
    "exec_argv",
    "spawn_in",
    "tool_version",
    "run_timed",
    "in_ebpf_dir",
];

/// Process-starting functions besides `Command::new` (libc, nix).
const RAW_SPAWNS: &[&str] = &[
    "fork",
    "vfork",
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "fexecve",
    "posix_spawn",
    "posix_spawnp",
    "system",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name();
        if p.is_dir() {
            if name != "target" && name != ".git" {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

struct Scan<'a> {
    file: &'a str,
    findings: Vec<String>,
}

impl Scan<'_> {
    fn finding(&mut self, span: Span, what: String) {
        self.findings
            .push(format!("{}:{}: {what}", self.file, span.start().line));
    }

    /// An argument that is a literal argv (`&["ip", ...]`, `["ip", ...]`, `vec!["ip", ...]`):
    /// its elements, `None` where an element is not a string literal.
    fn literal_argv(e: &Expr) -> Option<Vec<Option<String>>> {
        let elems: Vec<Expr> = match e {
            Expr::Reference(r) => return Self::literal_argv(&r.expr),
            Expr::Array(a) => a.elems.iter().cloned().collect(),
            Expr::Macro(m) if m.mac.path.is_ident("vec") => vec_elems(&m.mac)?,
            _ => return None,
        };
        let words: Vec<Option<String>> = elems
            .iter()
            .map(|e| match e {
                Expr::Lit(l) => match &l.lit {
                    Lit::Str(s) => Some(s.value()),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        words.first()?.as_ref()?;
        Some(words)
    }

    fn check_args<'e>(&mut self, args: impl Iterator<Item = &'e Expr>) {
        for a in args {
            let Some(words) = Self::literal_argv(a) else {
                continue;
            };
            let mut programs = vec![words[0].clone().unwrap_or_default()];
            if let [Some(ip), Some(netns), Some(exec), _, Some(inner), ..] = words.as_slice()
                && (ip.as_str(), netns.as_str(), exec.as_str()) == ("ip", "netns", "exec")
            {
                programs.push(inner.clone());
            }
            for p in programs {
                if tools::find(&p).is_none() {
                    self.finding(
                        a.span(),
                        format!("runs `{p}`, which tools.txt does not list"),
                    );
                }
            }
        }
    }
}

fn vec_elems(m: &Macro) -> Option<Vec<Expr>> {
    m.parse_body_with(Punctuated::<Expr, syn::Token![,]>::parse_terminated)
        .ok()
        .map(|p| p.into_iter().collect())
}

impl<'ast> Visit<'ast> for Scan<'_> {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // The one place's own tests name unlisted commands on purpose, to see them refused.
        if self.file == ONE_PLACE && m.ident == "tests" {
            return;
        }
        syn::visit::visit_item_mod(self, m);
    }

    fn visit_expr_path(&mut self, p: &'ast ExprPath) {
        let segs: Vec<String> = p
            .path
            .segments
            .iter()
            .map(|s| s.ident.to_string())
            .collect();
        let last = segs.last().map(String::as_str).unwrap_or("");
        let starts_process = segs.ends_with(&["Command".into(), "new".into()])
            || (segs.len() > 1 && RAW_SPAWNS.contains(&last));
        if starts_process && self.file != ONE_PLACE {
            self.finding(
                p.span(),
                format!(
                    "starts a process with `{}`: use testbed::cmd::command, which checks \
                     tools.txt (the agent itself starts none)",
                    segs.join("::")
                ),
            );
        }
        syn::visit::visit_expr_path(self, p);
    }

    fn visit_expr_call(&mut self, c: &'ast ExprCall) {
        if let Expr::Path(p) = &*c.func
            && p.path
                .segments
                .last()
                .is_some_and(|s| SPAWNERS.contains(&s.ident.to_string().as_str()))
        {
            self.check_args(c.args.iter());
        }
        syn::visit::visit_expr_call(self, c);
    }

    fn visit_expr_method_call(&mut self, m: &'ast ExprMethodCall) {
        if SPAWNERS.contains(&m.method.to_string().as_str()) {
            self.check_args(m.args.iter());
        }
        syn::visit::visit_expr_method_call(self, m);
    }

    fn visit_macro(&mut self, m: &'ast Macro) {
        // Code inside macro calls (assert!, format!, vec! ...) is tokens to syn: look inside
        // the ones whose bodies are expressions.
        if let Some(exprs) = vec_elems(m) {
            for e in &exprs {
                self.visit_expr(e);
            }
        }
        syn::visit::visit_macro(self, m);
    }
}

fn scan_rust(file: &str, text: &str) -> Vec<String> {
    let ast = match syn::parse_file(text) {
        Ok(a) => a,
        Err(e) => return vec![format!("{file}: does not parse: {e}")],
    };
    let mut s = Scan {
        file,
        findings: Vec::new(),
    };
    s.visit_file(&ast);
    s.findings
}

/// Shell words after which a command follows: keywords, `exec`.
const SHELL_PREFIXES: &[&str] = &[
    "if", "then", "else", "elif", "do", "while", "until", "!", "{", "(", "exec", "time",
];

/// Shell words that begin no command to look up: other keywords, and builtins (whose
/// arguments are not commands; `command -v x` only looks x up).
const SHELL_BUILTINS: &[&str] = &[
    "fi", "for", "done", "case", "esac", "in", "}", ")", ";;", "continue", "break", "cd", "set",
    "export", "printf", "echo", "read", "local", "return", "exit", "command", "test", "[", "true",
    "false", ":", ".", "trap", "shift", "unset", "wait",
];

/// A line of shell with what is not code blanked out: quoted text becomes `_` (except the
/// `$(...)` inside double quotes, which is code), and a trailing comment goes.
fn code_of(line: &str) -> String {
    enum Ctx {
        Code { parens: usize },
        Double,
        Single,
    }
    let mut stack = vec![Ctx::Code { parens: 0 }];
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        let subst = c == '$' && chars.peek() == Some(&'(');
        let depth = stack.len();
        match stack.last_mut().expect("never empty") {
            Ctx::Single => {
                if c == '\'' {
                    stack.pop();
                }
                out.push('_');
            }
            Ctx::Double if subst => {
                chars.next();
                out.push_str("$(");
                stack.push(Ctx::Code { parens: 0 });
            }
            Ctx::Double => {
                if c == '\\' {
                    chars.next();
                } else if c == '"' {
                    stack.pop();
                }
                out.push('_');
            }
            Ctx::Code { .. } if subst => {
                chars.next();
                out.push_str("$(");
                stack.push(Ctx::Code { parens: 0 });
            }
            Ctx::Code { parens } => match c {
                '\'' => {
                    stack.push(Ctx::Single);
                    out.push('_');
                }
                '"' => {
                    stack.push(Ctx::Double);
                    out.push('_');
                }
                '(' => {
                    *parens += 1;
                    out.push(c);
                }
                ')' if *parens == 0 && depth > 1 => {
                    stack.pop();
                    out.push(c);
                }
                ')' => {
                    *parens = parens.saturating_sub(1);
                    out.push(c);
                }
                '#' if depth == 1 && (out.is_empty() || out.ends_with(' ')) => break,
                _ => out.push(c),
            },
        }
    }
    out
}

/// The commands a small POSIX shell script runs: the first word of each simple command, after
/// assignments, keywords and builtins; names the script defines as functions are its own.
fn shell_commands(text: &str) -> Vec<(usize, String)> {
    let mut functions = Vec::new();
    let mut found = Vec::new();
    // Lines continued with a trailing backslash are one line, numbered by their first.
    let mut lines: Vec<(usize, String)> = Vec::new();
    let mut continued = false;
    for (n, l) in text.lines().enumerate() {
        let (body, more) = match l.strip_suffix('\\') {
            Some(b) => (b, true),
            None => (l, false),
        };
        match lines.last_mut() {
            Some((_, prev)) if continued => prev.push_str(body),
            _ => lines.push((n, body.to_owned())),
        }
        continued = more;
    }
    for (n, raw) in &lines {
        let n = *n;
        let line = match raw.trim_start() {
            l if l.starts_with('#') => continue,
            l => l,
        };
        let plain = code_of(line);
        // `name() { ...`: a function of the script's own.
        if let Some((name, _)) = plain.trim().split_once("()")
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            functions.push(name.to_owned());
        }
        let plain = plain
            .replace(">&", ">")
            .replace("<&", "<")
            .replace("&>", ">");
        for segment in plain.split(['|', ';', '&', '`']) {
            // The text after each `$(` is a command of its own; the text before the first is
            // not inside one, so a leading word ending in `)` there is a case pattern.
            for (i, part) in segment.split("$(").enumerate() {
                if part.starts_with('(') {
                    continue; // `$((`: arithmetic, not a command
                }
                let mut words = part.split_whitespace().skip_while(|w| {
                    SHELL_PREFIXES.contains(w)
                        || (w.contains('=') && !w.starts_with('='))
                        || (i == 0 && w.ends_with(')'))
                });
                let Some(w) = words.next() else { continue };
                let w = w.trim_start_matches('(').trim_end_matches(')');
                if w.is_empty()
                    || w.starts_with(['$', '-', '_'])
                    || w.contains(['<', '>'])
                    || SHELL_BUILTINS.contains(&w)
                {
                    continue;
                }
                found.push((n + 1, w.to_owned()));
            }
        }
    }
    found
        .into_iter()
        .filter(|(_, w)| !functions.contains(w))
        .collect()
}

#[test]
fn every_spawned_command_is_listed() {
    let root = workspace();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 30, "found only {} .rs files", files.len());
    let mut findings = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        findings.extend(scan_rust(&rel, &std::fs::read_to_string(f).unwrap()));
    }
    let mut scripts = vec!["x".to_owned()];
    for e in std::fs::read_dir(root.join(".ci")).unwrap().flatten() {
        scripts.push(format!(".ci/{}", e.file_name().to_string_lossy()));
    }
    assert!(scripts.contains(&".ci/run".to_owned()));
    for script in &scripts {
        let text = std::fs::read_to_string(root.join(script)).unwrap();
        for (line, cmd) in shell_commands(&text) {
            // The project's own scripts (./x) run by path.
            let own = cmd.starts_with("./") && root.join(&cmd).is_file();
            if !own && tools::find(&cmd).is_none() {
                findings.push(format!(
                    "{script}:{line}: runs `{cmd}`, which tools.txt does not list"
                ));
            }
        }
    }
    assert!(
        findings.is_empty(),
        "commands that tools.txt, the list `./x setup` installs from, does not cover:\n{}",
        findings.join("\n")
    );
}

#[test]
fn the_scan_finds_an_unlisted_command_and_a_stray_spawn() {
    let src = r#"
        fn f(ns: &Netns) {
            let _ = run(&["ip", "link"]);
            let _ = run(&["telnet", "get", "pods"]);
            let _ = ns.exec(&["nft", "list", "ruleset"]);
            let _ = ns.exec_argv(&vec!["socat", "-"]);
            let _ = command(&["ip", "netns", "exec", name, "tcpdump", "-i", "eth0"]);
            assert!(run(&["iperf3", "-c"]).is_ok());
            let _ = std::process::Command::new("ip");
            let _ = unsafe { libc::fork() };
        }
    "#;
    let got = scan_rust("some/file.rs", src);
    let want = [
        "some/file.rs:4: runs `telnet`",
        "some/file.rs:6: runs `socat`",
        "some/file.rs:7: runs `tcpdump`",
        "some/file.rs:8: runs `iperf3`",
        "some/file.rs:9: starts a process with `std::process::Command::new`",
        "some/file.rs:10: starts a process with `libc::fork`",
    ];
    assert_eq!(got.len(), want.len(), "{got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert!(g.starts_with(w), "expected `{w}...`, got `{g}`");
    }
    // The one place may start processes, and its tests may name unlisted commands.
    assert!(scan_rust(ONE_PLACE, "fn f() { Command::new(argv[0]); }").is_empty());
    assert!(
        scan_rust(
            ONE_PLACE,
            "mod tests { fn t() { command(&[\"telnet\"]); } }"
        )
        .is_empty()
    );
    assert_eq!(
        scan_rust(
            ONE_PLACE,
            "mod other { fn t() { command(&[\"telnet\"]); } }"
        )
        .len(),
        1
    );
}

#[test]
fn the_shell_scan_sees_each_command_a_script_runs() {
    let script = r#"#!/bin/sh
set -eu
cd "$(dirname "$0")"   # a comment: rm -rf /
say() { printf 'x: %s\n' "$*" >&2; }
now() { date +%s; }
t=$(now)
[ "$(id -u)" = 0 ] || die "run apt-get as root"
if ! command -v rustup >/dev/null 2>&1; then
    curl -sSf -o "$dir/x" "$url" && wget -q "$url"
    DEBIAN_FRONTEND=noninteractive apt-get install -y $missing
fi
echo "$sum" | sha256sum -c --quiet
exec cargo xtask "$@"
chroot "$root" /usr/bin/env -i \
    PATH=/bin /bin/sh -c "cd /src"
"#;
    let got: Vec<String> = shell_commands(script)
        .into_iter()
        .map(|(l, c)| format!("{l}:{c}"))
        .collect();
    assert_eq!(
        got,
        [
            "3:dirname",
            "5:date",
            "7:id",
            "7:die",
            "9:curl",
            "9:wget",
            "10:apt-get",
            "12:sha256sum",
            "13:cargo",
            "14:chroot"
        ]
    );
}
