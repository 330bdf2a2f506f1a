//! The `ws-gateway` command: thin, the library does the work.

fn main() -> std::process::ExitCode {
    ws_gateway::cli::main()
}
