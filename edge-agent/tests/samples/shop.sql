CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id TEXT, channel TEXT, total_cents INTEGER,
                     currency TEXT, status TEXT, created_at TEXT);
CREATE TABLE order_items (order_id INTEGER, sku TEXT, quantity INTEGER, unit_price_cents INTEGER);
INSERT INTO orders VALUES (1, 'c-1', 'web', 5990, 'EUR', 'paid', '2026-11-27 10:00:00'),
                          (2, 'c-2', 'app', 1500, 'EUR', 'cancelled', '2026-11-27 10:05:00'),
                          (3, 'qa-bot', 'web', 100, 'EUR', 'paid', '2026-11-27 10:06:00');
INSERT INTO order_items VALUES (1, 'sku-1', 2, 2995), (2, 'sku-2', 1, 1500), (3, 'sku-1', 1, 100);
