package dev.actidash.bench;

import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.time.Instant;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicLong;

import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.SessionWindows;
import org.apache.kafka.streams.processor.TimestampExtractor;

/**
 * Sessions per visitor (30-minute inactivity gap, event time from the ActiDash event's
 * {@code event_time}), counted with exactly_once_v2 over the behavior topic: the peer of
 * ActiDash's processor in benchmark P4. Prints {@code RATE <events/s>} (first to last record
 * processed) once {@code expected} records have been processed and committed.
 *
 * Usage: SessionCount bootstrap topic expected application-id state-dir
 */
public final class SessionCount {
    /** Event time from the JSON value: the text of {@code "event_time":"…"}. */
    public static final class EventTime implements TimestampExtractor {
        @Override
        public long extract(ConsumerRecord<Object, Object> record, long partitionTime) {
            String json = new String((byte[]) record.value(), StandardCharsets.UTF_8);
            int at = json.indexOf("\"event_time\":\"");
            if (at < 0) {
                return partitionTime;
            }
            int start = at + 14;
            return Instant.parse(json.substring(start, json.indexOf('"', start))).toEpochMilli();
        }
    }

    public static void main(String[] args) throws Exception {
        String bootstrap = args[0], topic = args[1], appId = args[3], stateDir = args[4];
        long expected = Long.parseLong(args[2]);
        Properties props = new Properties();
        props.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        props.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
        props.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        props.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1);
        props.put(StreamsConfig.STATE_DIR_CONFIG, stateDir);
        props.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 1);
        props.put(StreamsConfig.consumerPrefix(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG), "earliest");

        AtomicLong processed = new AtomicLong();
        AtomicLong first = new AtomicLong();
        AtomicLong last = new AtomicLong();
        CountDownLatch done = new CountDownLatch(1);
        StreamsBuilder builder = new StreamsBuilder();
        builder.stream(topic, Consumed.with(Serdes.String(), Serdes.ByteArray()).withTimestampExtractor(new EventTime()))
            .peek((k, v) -> {
                long n = processed.incrementAndGet();
                long now = System.nanoTime();
                first.compareAndSet(0, now);
                if (n == expected) {
                    last.set(now);
                    done.countDown();
                }
            })
            .groupByKey()
            .windowedBy(SessionWindows.ofInactivityGapAndGrace(Duration.ofMinutes(30), Duration.ofHours(24)))
            .count()
            .toStream()
            .foreach((window, count) -> { });
        try (KafkaStreams streams = new KafkaStreams(builder.build(), props)) {
            streams.start();
            if (!done.await(30, java.util.concurrent.TimeUnit.MINUTES)) {
                System.out.println("TIMEOUT " + processed.get());
                System.exit(1);
            }
            double seconds = (last.get() - first.get()) / 1e9;
            System.out.printf("RATE %.0f%n", (expected - 1) / Math.max(seconds, 1e-9));
            streams.close(Duration.ofSeconds(30));
        }
    }
}
