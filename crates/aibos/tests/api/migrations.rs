//! Migrations: reversible, recorded with checksums, refused when tampered with.

use std::path::PathBuf;

use aibos_kernel::config::{Config, ConfigSources};
use aibos_kernel::db::Db;
use aibos_kernel::db::migrate::{self, MigrationError, MigrationState};
use aibos_testkit::{Engine, TestDb};
use sqlx::migrate::Migrator;

pub(crate) async fn connect(test_db: &TestDb) -> Db {
    let dir = tempfile::tempdir().unwrap();
    let sources = ConfigSources::new(
        dir.path(),
        [("AIBOS_DATABASE__URL".to_owned(), test_db.url().to_owned())],
    );
    Db::connect(&Config::load(&sources).unwrap().database)
        .await
        .unwrap()
}

/// Every table, column, index and trigger of the kernel's schema, in a stable order.
pub(crate) async fn catalogue(db: &Db) -> Vec<String> {
    let rows: Vec<(String,)> = match db {
        Db::Sqlite(aibos_kernel::db::SqliteDb { pool, .. }) => sqlx::query_as(
            "SELECT type || ' ' || name || ' ' || tbl_name || ' ' || coalesce(sql, '') FROM sqlite_master \
             WHERE name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations' ORDER BY type, name",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
        Db::Postgres(pool) => sqlx::query_as(
            "SELECT 'column ' || table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, '') \
               FROM information_schema.columns WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' \
             UNION ALL SELECT 'index ' || indexname || ' ' || indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename <> '_sqlx_migrations' \
             UNION ALL SELECT 'constraint ' || conrelid::regclass::text || ' ' || pg_get_constraintdef(oid) FROM pg_constraint \
               WHERE connamespace = 'public'::regnamespace AND conrelid::regclass::text <> '_sqlx_migrations' \
             UNION ALL SELECT 'trigger ' || tgname || ' ' || tgrelid::regclass::text FROM pg_trigger WHERE NOT tgisinternal \
             UNION ALL SELECT 'function ' || proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace \
             ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    };
    rows.into_iter().map(|(r,)| r).collect()
}

fn source_dir(engine: Engine) -> PathBuf {
    let folder = match engine {
        Engine::Sqlite => "sqlite",
        Engine::Postgres => "postgres",
    };
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../migrations")
        .join(folder)
}

fn embedded(db: &Db) -> &'static Migrator {
    migrate::embedded(db.engine())
}

crate::both_engines! {
    async fn down_all_then_up_restores_the_same_schema(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let db = connect(&test_db).await;
        let applied = migrate::up(&db, embedded(&db)).await.unwrap();
        assert!(!applied.is_empty());
        let before = catalogue(&db).await;
        assert!(before.iter().any(|r| r.contains("tenants")), "{before:?}");

        let reverted = migrate::down(&db, embedded(&db), 1000).await.unwrap();
        assert_eq!(reverted.len(), applied.len());
        assert!(catalogue(&db).await.is_empty(), "nothing of the schema is left after reverting everything");
        assert!(migrate::status(&db, embedded(&db)).await.unwrap().iter().all(|s| s.state == MigrationState::Pending));

        migrate::up(&db, embedded(&db)).await.unwrap();
        assert_eq!(catalogue(&db).await, before);
        db.close().await;
    }

    async fn down_steps_reverts_only_the_newest(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let db = connect(&test_db).await;
        let applied = migrate::up(&db, embedded(&db)).await.unwrap();
        let reverted = migrate::down(&db, embedded(&db), 1).await.unwrap();
        assert_eq!(reverted, vec![*applied.last().unwrap()]);
        let status = migrate::status(&db, embedded(&db)).await.unwrap();
        assert_eq!(status.iter().filter(|s| s.state == MigrationState::Applied).count(), applied.len() - 1);
        assert!(matches!(migrate::down(&db, embedded(&db), 0).await, Err(MigrationError::Steps)));
        db.close().await;
    }

    /// 0006 makes a route name a permission or say it is public; routes that
    /// already named none were open to every authenticated caller and stay so.
    async fn routes_without_permissions_stay_open_through_0006(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let db = connect(&test_db).await;
        let applied = migrate::up(&db, embedded(&db)).await.unwrap();
        // 0006 and every migration after it reverted.
        let after_0005 = applied.iter().filter(|v| **v >= 6).count() as u32;
        assert_eq!(migrate::down(&db, embedded(&db), after_0005).await.unwrap().len(), after_0005 as usize);
        let pending: Vec<_> = migrate::status(&db, embedded(&db)).await.unwrap().into_iter().filter(|s| s.state != MigrationState::Applied).map(|s| s.version).collect();
        // Every migration from 0006 on (numbers may have gaps: branches reserve theirs).
        assert_eq!(pending, applied.iter().copied().filter(|v| *v >= 6).collect::<Vec<_>>(), "0006 reverted");
        let system = "00000000-0000-7000-8000-000000000001";
        aibos_kernel::with_db!(&db, pool => {
            sqlx::query("INSERT INTO canons (id, tenant_id, name, base_url, health_path, permissions, created_at, updated_at) \
                         VALUES ('c1', $1, 'pay', 'http://127.0.0.1:9', '/health', '[]', 't', 't')")
                .bind(system).execute(pool).await.unwrap();
            for (id, path, permissions) in [("r1", "/open", "[]"), ("r2", "/closed", "[\"finance.payment.read\"]")] {
                sqlx::query("INSERT INTO routes (id, tenant_id, canon_id, method, path, path_shape, required_permissions, created_at, updated_at) \
                             VALUES ($1, $2, 'c1', 'GET', $3, $3, $4, 't', 't')")
                    .bind(id).bind(system).bind(path).bind(permissions).execute(pool).await.unwrap();
            }
        });
        migrate::up(&db, embedded(&db)).await.unwrap();
        let rows: Vec<(String, bool)> = aibos_kernel::with_db!(&db, pool =>
            sqlx::query_as("SELECT id, public_to_authenticated FROM routes ORDER BY id").fetch_all(pool).await.unwrap());
        assert_eq!(rows, [("r1".to_owned(), true), ("r2".to_owned(), false)]);
        db.close().await;
    }

    async fn the_system_tenant_exists_from_the_first_migration(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let db = connect(&test_db).await;
        migrate::up(&db, embedded(&db)).await.unwrap();
        let (slug, status): (String, String) = aibos_kernel::with_db!(&db, pool =>
            sqlx::query_as("SELECT slug, status FROM tenants WHERE id = '00000000-0000-7000-8000-000000000001'").fetch_one(pool).await.unwrap());
        assert_eq!((slug.as_str(), status.as_str()), ("system", "active"));
        db.close().await;
    }

    async fn a_tampered_migration_is_refused(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let db = connect(&test_db).await;
        let copy = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(source_dir(engine)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
        }
        let migrator = Migrator::new(copy.path()).await.unwrap();
        migrate::up(&db, &migrator).await.unwrap();

        let first = std::fs::read_dir(copy.path()).unwrap().map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with(".up.sql")).min().unwrap();
        let mut sql = std::fs::read_to_string(&first).unwrap();
        sql.push_str("\n-- an innocent-looking edit\n");
        std::fs::write(&first, sql).unwrap();

        let tampered = Migrator::new(copy.path()).await.unwrap();
        let err = migrate::up(&db, &tampered).await.unwrap_err();
        assert!(matches!(err, MigrationError::Modified(1)), "{err}");
        assert!(err.to_string().contains("edited after it ran"), "{err}");
        let status = migrate::status(&db, &tampered).await.unwrap();
        assert_eq!(status[0].state, MigrationState::Modified);
        assert!(matches!(migrate::down(&db, &tampered, 1).await, Err(MigrationError::Modified(1))));
        db.close().await;
    }

    async fn baseline_records_without_running(engine: Engine) {
        let test_db = TestDb::create(engine).await.unwrap();
        let db = connect(&test_db).await;
        let recorded = migrate::baseline(&db, embedded(&db)).await.unwrap();
        assert!(!recorded.is_empty());
        assert!(migrate::status(&db, embedded(&db)).await.unwrap().iter().all(|s| s.state == MigrationState::Applied));
        assert!(catalogue(&db).await.is_empty(), "baseline ran no SQL");
        db.close().await;
    }
}
