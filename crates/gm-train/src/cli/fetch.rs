//! `gm fetch`.

use anyhow::Result;

/// Download a data set into gm's cache and print its folder.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    #[arg(long, default_value = "mnist")]
    pub dataset: String,
}

pub fn run(args: FetchArgs) -> Result<()> {
    let FetchArgs { dataset } = args;
    let (dir, src) = gm_train::fetch::ensure_dataset(&dataset)?;
    eprintln!("gm: {src}");
    println!("{}", dir.display());
    Ok(())
}
