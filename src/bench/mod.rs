//! `ws-gateway bench`: the load-test framework (issue 7). Being written.

#[derive(clap::Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench is not implemented yet")
}
