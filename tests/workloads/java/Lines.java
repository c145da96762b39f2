public class Lines {
    static volatile long sink;
    static void near() {
        sink += 1;
        sink += 2;
    }
    static void far() {
        sink += 1;
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        // padding
        sink += 2;
    }
    public static void main(String[] a) throws Exception {
        near();
        far();
        System.out.println("ready");
        Thread.sleep(120_000);
    }
}
