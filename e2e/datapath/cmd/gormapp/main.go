// Command gormapp is a typical Go app bound by cloudsql-binder: it knows nothing but
// the env the operator injects (INSTANCE_UNIX_SOCKET, DB_NAME, DB_USER,
// DB_POOL_MAX_CONNS) and connects the way Google's samples do, through the proxy's
// Unix socket with GORM's PostgreSQL driver.
package main

import (
	"fmt"
	"os"
	"strconv"
	"sync"

	"gorm.io/driver/postgres"
	"gorm.io/gorm"
	"gorm.io/gorm/logger"
)

// Order is the table the app migrates.
type Order struct {
	ID   uint `gorm:"primaryKey"`
	Item string
	Qty  int
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "gormapp:", err)
		os.Exit(1)
	}
}

func mustEnv(name string) (string, error) {
	v := os.Getenv(name)
	if v == "" {
		return "", fmt.Errorf("env %s is not set", name)
	}
	return v, nil
}

func run() error {
	var socket, name, user, poolMax string
	for _, e := range []struct {
		dst  *string
		name string
	}{{&socket, "INSTANCE_UNIX_SOCKET"}, {&name, "DB_NAME"}, {&user, "DB_USER"}, {&poolMax, "DB_POOL_MAX_CONNS"}} {
		v, err := mustEnv(e.name)
		if err != nil {
			return err
		}
		*e.dst = v
	}
	maxConns, err := strconv.Atoi(poolMax)
	if err != nil {
		return fmt.Errorf("DB_POOL_MAX_CONNS: %w", err)
	}

	dsn := fmt.Sprintf("host=%s user=%s dbname=%s sslmode=disable", socket, user, name)
	db, err := gorm.Open(postgres.Open(dsn), &gorm.Config{Logger: logger.Discard})
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	sqlDB, err := db.DB()
	if err != nil {
		return err
	}
	defer sqlDB.Close()
	sqlDB.SetMaxOpenConns(maxConns)

	if err := db.AutoMigrate(&Order{}); err != nil {
		return fmt.Errorf("migrate: %w", err)
	}
	orders := []Order{{Item: "coffee", Qty: 2}, {Item: "bagel", Qty: 1}, {Item: "tea", Qty: 3}}
	if err := db.Create(&orders).Error; err != nil {
		return fmt.Errorf("insert: %w", err)
	}
	var got []Order
	if err := db.Order("id").Find(&got).Error; err != nil {
		return fmt.Errorf("select: %w", err)
	}
	if len(got) != len(orders) || got[2].Item != "tea" {
		return fmt.Errorf("read back %+v, want the %d rows just written", got, len(orders))
	}

	// Twice as many concurrent queries as the pool allows: the pool queues them, so
	// the proxy, capped at the same number, never has to refuse one.
	var wg sync.WaitGroup
	errs := make(chan error, 2*maxConns)
	for range 2 * maxConns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- db.Exec("select pg_sleep(0.2)").Error
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			return fmt.Errorf("concurrent query: %w", err)
		}
	}

	var who string
	if err := db.Raw("select current_user || '@' || current_database()").Scan(&who).Error; err != nil {
		return err
	}
	fmt.Printf("gormapp: ok %s rows=%d concurrent=%d maxOpenConns=%d\n",
		who, len(got), 2*maxConns, sqlDB.Stats().MaxOpenConnections)
	return nil
}
