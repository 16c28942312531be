//! kmsctl, the scriptable client of kmsd. Everything lives in `src/ctl/`, where the
//! dashboard can reach it too.

#[path = "../ctl/mod.rs"]
mod ctl;

fn main() -> std::process::ExitCode {
    ctl::main()
}
