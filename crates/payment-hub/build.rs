// sqlx::migrate! embeds the migration files at compile time but does not
// notice new or changed files by itself.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
