//! kms-tui: the terminal dashboard of kms. Everything lives in the `tui` module.

mod tui;

fn main() -> std::process::ExitCode {
    tui::main()
}
