//! The list of every external command the project runs, and where each comes from: the
//! workspace's `tools.txt`, compiled in. `./x` installs its `x` rows, `./x setup` the
//! rest, and [`crate::cmd::command`] refuses to spawn anything it does not list.
use std::sync::LazyLock;

/// `tools.txt` as written.
pub const LIST: &str = include_str!("../../tools.txt");

/// The list's name, for messages.
pub const LIST_PATH: &str = "tools.txt";

/// Where a listed command comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// A Debian 12 package, installed with apt-get.
    Apt(&'static str),
    /// rustup itself, which `./x` downloads when the machine has none.
    RustupInit,
    /// A component of a rustup toolchain (cargo).
    Rustup,
    /// A crate installed with `cargo install` by `./x setup`.
    Cargo(&'static str),
    /// Go: the machine's, or the pinned toolchain from the Go module proxy (`./x setup`).
    GoProxy,
    /// Built by `./x setup` from this Go module, into the control plane's cache.
    GoBuild(&'static str),
    /// Installed by `./x setup` from PyPI (`name==version`) into a virtualenv in the cache,
    /// [`crate::vm::venv_bin`].
    Pip(&'static str),
}

/// Who installs it: `./x` before any Rust code can compile, or `./x setup`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    X,
    Setup,
}

/// One row of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    /// The name spawned; `None` for a row that provides files rather than a command.
    pub command: Option<&'static str>,
    pub provider: Provider,
    pub stage: Stage,
    pub used_by: Vec<&'static str>,
    pub why: &'static str,
}

/// A line of `tools.txt` that does not read as a row.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{LIST_PATH} line {line}: {problem}: `{text}`")]
pub struct ListError {
    pub line: usize,
    pub text: String,
    pub problem: &'static str,
}

/// Parses the list's text (comments and blank lines skipped).
pub fn parse(text: &'static str) -> Result<Vec<Tool>, ListError> {
    let mut tools = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let err = |problem| ListError {
            line: i + 1,
            text: raw.to_owned(),
            problem,
        };
        // Four words, then `why`: the rest of the line.
        let mut rest = l;
        let mut word = || {
            let s = rest.trim_start();
            let end = s.find(char::is_whitespace).unwrap_or(s.len());
            rest = &s[end..];
            Some(&s[..end]).filter(|w| !w.is_empty())
        };
        let (Some(command), Some(provider), Some(stage), Some(used_by)) =
            (word(), word(), word(), word())
        else {
            return Err(err("expected: command provider stage used-by why"));
        };
        let why = rest.trim();
        let provider = match provider.split_once(':') {
            Some(("apt", pkg)) if !pkg.is_empty() => Provider::Apt(pkg),
            Some(("cargo", krate)) if !krate.is_empty() => Provider::Cargo(krate),
            Some(("go-build", module)) if !module.is_empty() => Provider::GoBuild(module),
            Some(("pip", spec))
                if spec
                    .split_once("==")
                    .is_some_and(|(n, v)| !n.is_empty() && !v.is_empty()) =>
            {
                Provider::Pip(spec)
            }
            None if provider == "go-proxy" => Provider::GoProxy,
            None if provider == "rustup-init" => Provider::RustupInit,
            None if provider == "rustup" => Provider::Rustup,
            _ => {
                return Err(err(
                    "provider must be apt:PKG, cargo:CRATE, go-build:MODULE, pip:NAME==VERSION, rustup, rustup-init or go-proxy",
                ));
            }
        };
        let stage = match stage {
            "x" => Stage::X,
            "setup" => Stage::Setup,
            _ => return Err(err("stage must be x or setup")),
        };
        if why.is_empty() {
            return Err(err("every row says why the command is needed"));
        }
        tools.push(Tool {
            command: (command != "-").then_some(command),
            provider,
            stage,
            used_by: used_by.split(',').collect(),
            why,
        });
    }
    Ok(tools)
}

static TOOLS: LazyLock<Vec<Tool>> = LazyLock::new(|| parse(LIST).unwrap_or_else(|e| panic!("{e}")));

/// Every row of `tools.txt`.
pub fn all() -> &'static [Tool] {
    &TOOLS
}

/// The row of command `name` (a bare name, as spawned), if listed.
pub fn find(name: &str) -> Option<&'static Tool> {
    all().iter().find(|t| t.command == Some(name))
}

/// The Debian package that provides `name`, for messages.
pub fn package_of(name: &str) -> Option<&'static str> {
    match find(name)?.provider {
        Provider::Apt(p) => Some(p),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_and_names_each_command_once() {
        let tools = parse(LIST).unwrap();
        assert!(tools.len() > 20, "only {} rows", tools.len());
        let mut names: Vec<_> = tools.iter().filter_map(|t| t.command).collect();
        let n = names.len();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), n, "a command is listed twice");
        assert_eq!(
            find("nft").map(|t| &t.provider),
            Some(&Provider::Apt("nftables"))
        );
        assert_eq!(find("rustup").map(|t| t.stage), Some(Stage::X));
        assert_eq!(
            find("bpf-linker").map(|t| &t.provider),
            Some(&Provider::Cargo("bpf-linker"))
        );
        assert!(find("telnet").is_none());
    }

    #[test]
    fn a_row_keeps_its_why_whole() {
        let t = parse("ip  apt:iproute2  setup  tests,demo  network namespaces, veths\n").unwrap();
        assert_eq!(
            t,
            vec![Tool {
                command: Some("ip"),
                provider: Provider::Apt("iproute2"),
                stage: Stage::Setup,
                used_by: vec!["tests", "demo"],
                why: "network namespaces, veths",
            }]
        );
    }

    #[test]
    fn bad_rows_are_refused_with_their_line() {
        for (text, problem) in [
            (
                "ip apt:iproute2 setup\n",
                "expected: command provider stage used-by why",
            ),
            (
                "ip deb:iproute2 setup tests why\n",
                "provider must be apt:PKG, cargo:CRATE, go-build:MODULE, pip:NAME==VERSION, rustup, rustup-init or go-proxy",
            ),
            (
                "ip apt: setup tests why\n",
                "provider must be apt:PKG, cargo:CRATE, go-build:MODULE, pip:NAME==VERSION, rustup, rustup-init or go-proxy",
            ),
            (
                "ip apt:iproute2 later tests why\n",
                "stage must be x or setup",
            ),
            (
                "ip apt:iproute2 setup tests\n",
                "every row says why the command is needed",
            ),
        ] {
            let text: &'static str = Box::leak(format!("# c\n\n{text}").into_boxed_str());
            assert_eq!(
                parse(text).map(|_| ()),
                Err(ListError {
                    line: 3,
                    text: text.lines().nth(2).unwrap().to_owned(),
                    problem
                }),
                "{text}"
            );
        }
    }
}
