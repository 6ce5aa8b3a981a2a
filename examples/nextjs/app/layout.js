export const metadata = {
  title: "Recorder · m1server from Next.js",
  description: "Records from the camera and uploads to m1server while recording",
};

export default function RootLayout({ children }) {
  return (
    <html lang="en">
      <body style={{ fontFamily: "system-ui, sans-serif", margin: 0, background: "#f5f6f8" }}>
        {children}
      </body>
    </html>
  );
}
